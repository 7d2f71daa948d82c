"""LoRA training of the MUSIC model on the tiny zoo: the planner overfits 8 fixed samples, the
renderer's flow-matching loss falls, kill -9 then resume gives the uninterrupted run's losses, a
trained adapter saves, reloads, changes the outputs and merges; plus the label mask and the
streamed data order."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from data_specs.train import load_train_spec, parse_train_spec
from music_model.subjects.layout import box_to_mask, layout_grid, layout_to_text
from tasks.stages import published_schema

CATEGORIES = ["dog", "cat", "cup", "ball", "lamp", "book"]


def _png(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_published(folder: Path, samples: int = 8, size: int = 64, reference: int = 32, files: int = 1, seed: int = 0) -> Path:
    """A published training set (tasks.stages.published_schema()) of `samples` fixed 2-3 subject scenes:
    coloured boxes on grey, each subject's reference a patch of its colour, layout from the boxes."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(samples):
        k = 2 + i % 2
        boxes = [[x, y, x + 0.3, y + 0.3] for x, y in rng.uniform(0, 0.65, (k, 2))]
        layout = layout_grid(np.stack([box_to_mask(np.array(b), size, size) for b in boxes]), list(range(1, k + 1)))
        colors = [tuple(int(c) for c in rng.integers(0, 255, 3)) for _ in range(k)]
        target = Image.new("RGB", (size, size), (128, 128, 128))
        for box, color in zip(boxes, colors):
            target.paste(color, tuple(int(v * size) for v in box))
        names = [CATEGORIES[(i + s) % len(CATEGORIES)] for s in range(k)]
        cot = {"subjects": [{"id": s + 1, "role": names[s], "placement": "middle center of the image"} for s in range(k)],
               "relations": ["<s1> near <s2>"] if i % 3 == 0 else []}
        rows.append({"id": f"sample-{i:02d}", "source_id": f"source-{i:02d}", "num_subjects": k, "image": _png(target), "caption": "scene",
                     "instruction": "a photo of " + " and ".join(f"<s{s + 1}>" for s in range(k)), "cot": json.dumps(cot),
                     "layout": layout.tolist(), "layout_text": layout_to_text(layout), "subject_ids": list(range(1, k + 1)),
                     "categories": names, "boxes": boxes, "masks": [{"size": [size, size], "counts": ""}] * k, "regions": ["box"] * k,
                     "references": [_png(Image.new("RGB", (reference, reference), c)) for c in colors]})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    per_file = -(-samples // files)
    for f in range(files):
        table = pa.Table.from_pylist(rows[f * per_file : (f + 1) * per_file], schema=published_schema())
        pq.write_table(table, folder / "data" / f"train-{f:05d}-of-{files:05d}.parquet", row_group_size=3)
    return folder


def tiny_spec(tmp_path: Path, dataset: Path, **changes):
    data = load_train_spec("train_tiny.yaml").model_dump()
    data |= {"dataset": str(dataset), "output_root": str(tmp_path / "runs"), "pipeline": None}
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return parse_train_spec(data)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_published(tmp_path_factory.mktemp("published"))


@pytest.fixture(scope="module")
def trained_like_planner(tmp_path_factory, zoo_root) -> Path:
    """The zoo's tiny Qwen2.5-VL with its (tied) token embeddings scaled x5, to std 0.1. At the random
    init's std 0.02 the frozen output layer caps every logit near +-1.3 after the final RMSNorm, so no
    LoRA update can move the cross-entropy far below ln(vocab) (it plateaus near 6.7 of 8.0); trained
    checkpoints have embeddings of this larger scale. Everything else is the zoo checkpoint."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from music_model.zoo import ensure_entry

    source, target = ensure_entry("qwen2_5_vl"), tmp_path_factory.mktemp("planner")
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(5.0)
    model.save_pretrained(target)
    AutoProcessor.from_pretrained(source).save_pretrained(target)
    return target


def test_the_label_mask_keeps_exactly_the_plan_and_end_tokens(tmp_path, dataset):
    from music_model.music.plan import format_plan
    from music_model.music.training import PlannerTrainer, PublishedStream, decode_sample

    spec = tiny_spec(tmp_path, dataset)
    trainer = PlannerTrainer(spec)
    row = next(PublishedStream(dataset).rows(0, 0, 0, 1))[2]
    sample = decode_sample(row, 8)
    example = trainer.example(sample)
    labels, ids = example["labels"], example["input_ids"]
    kept = labels != -100
    start = int(kept.float().argmax())
    assert kept[start:].all() and not kept[:start].any()  # one contiguous run at the end: prompt and images masked
    assert (labels[kept] == ids[kept]).all()
    tokenizer = trainer.planner.vlm.processor.tokenizer
    assert tokenizer.decode(ids[kept][:-1]) == format_plan(sample.plan)
    assert int(ids[kept][-1]) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    image_token = trainer.planner.vlm.model.config.image_token_id
    assert (ids[:start] == image_token).sum() == sum(example["image_grid_thw"].prod(dim=1)) // 4  # every image token masked
    trainer.max_seq_len = 16
    with pytest.raises(ValueError, match="tokens > plan.max_seq_len=16"):
        trainer.example(sample)


def test_the_planner_overfits_eight_samples(tmp_path, dataset, trained_like_planner):
    from music_model.music.training import train

    spec = tiny_spec(tmp_path, dataset, planner={"model": str(trained_like_planner)}, loss_weights={"planner": 1.0, "renderer": 0.0},
                     optim={"lr": 5e-3}, epochs=1000, max_steps=60, micro_batch_size=8, grad_accum=1, checkpoint_every=1000)
    curve = []
    summary = train(spec, on_step=lambda record: curve.append(record["planner"]))
    print("planner CE by step:", " ".join(f"{i + 1}:{v:.3f}" for i, v in enumerate(curve) if i % 5 == 0 or i == len(curve) - 1))
    halved = next((i + 1 for i, v in enumerate(curve) if v <= curve[0] / 2), None)
    print(f"first {curve[0]:.3f}, last {curve[-1]:.3f}, halved at step {halved}")
    assert len(curve) == 60 and summary["steps"] == 60 and summary["samples"] == 480
    # Measured here: CE 9.08 -> 4.32, halved at step 44; a slower learner (a fifth of the step size)
    # does not halve it within the 60 steps.
    assert halved is not None and halved <= 50
    assert np.mean(curve[-10:]) < np.mean(curve[-20:-10]) < np.mean(curve[:10])  # still falling at the end
    assert summary["trainable_parameters"] == {"planner": 131072}  # LoRA rank 64 on 7 projections x 2 layers only


def test_the_renderer_flow_matching_loss_falls(tmp_path, dataset):
    from music_model.music.training import PublishedStream, RendererTrainer, decode_sample

    spec = tiny_spec(tmp_path, dataset)
    trainer = RendererTrainer(spec)
    samples = [decode_sample(row, 8) for _, _, row in list(PublishedStream(dataset).rows(0, 0, 0, 1))[:2]]
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=3e-3)

    def held_out() -> float:  # the same noise and timesteps every time
        with torch.no_grad():
            return float(np.mean([trainer.loss(samples, torch.Generator().manual_seed(1000 + k)).item() for k in range(4)]))

    before = held_out()
    for step in range(30):
        optimizer.zero_grad()
        trainer.loss(samples, torch.Generator().manual_seed(step)).backward()
        optimizer.step()
    after = held_out()
    print(f"renderer flow-matching loss on fixed noise: {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before


TRAIN_SCRIPT = "import sys; from data_specs.train import load_train_spec; from music_model.music.training import train; train(load_train_spec(sys.argv[1]))"


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_losses(tmp_path, dataset):
    from music_model.music.training import read_history, train

    changes = dict(optim={"lr": 1e-3}, max_steps=9, micro_batch_size=2, grad_accum=2, checkpoint_every=3)
    reference = train(tiny_spec(tmp_path / "uninterrupted", dataset, **changes))
    expected = read_history(reference["output"])
    assert len(expected) == 9 and reference["samples"] == 36 and expected[-1]["epoch"] == 4  # 8 rows a epoch, 4 a step

    spec = tiny_spec(tmp_path / "killed", dataset, **changes)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    process = subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_checkpoint = spec.out_dir() / "checkpoints" / "step-00000003" / "state.json"
    deadline = time.monotonic() + 300
    while not first_checkpoint.exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_at = len(read_history(spec.out_dir()))
    assert 3 <= killed_at < 9  # killed mid-run

    resumed = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, str(path)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((spec.out_dir() / "summary.json").read_text())
    assert summary["resumed_from"] in {"step-00000003", "step-00000006"} and summary["steps"] == 9
    history = read_history(spec.out_dir())
    print("uninterrupted:", [round(r["loss"], 6) for r in expected])
    print(f"killed after {killed_at} logged steps, resumed from {summary['resumed_from']}:", [round(r["loss"], 6) for r in history])
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert strip(history) == strip(expected)  # every loss, lr, epoch and sample count, bit for bit


def test_a_trained_adapter_saves_reloads_changes_outputs_and_merges(tmp_path, dataset):
    from music_model.music.model import GenerationCase, MusicModel
    from music_model.music.training import train

    spec = tiny_spec(tmp_path, dataset, optim={"lr": 5e-3}, max_steps=4, micro_batch_size=4, grad_accum=1)
    summary = train(spec)
    adapters = Path(summary["output"]) / "adapter"
    assert (adapters / "planner" / "adapter_model.safetensors").exists()
    assert (adapters / "renderer" / "pytorch_lora_weights.safetensors").exists()
    base, merged, unmerged = MusicModel.from_spec(spec), MusicModel.from_spec(spec, adapters), MusicModel.from_spec(spec, adapters, merge=False)

    case = GenerationCase("case", "a photo of <s1> and <s2>", [Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 220))],
                          ["dog", "cat"])
    inputs = base.planner.encode([case.references], [case.instruction], [case.categories])

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model.planner.vlm.model(**inputs.to(model.planner.vlm.device)).logits[0, -5:].float()

    assert (logits(base) - logits(merged)).abs().max() > 1e-3  # the adapter changes the planner
    assert torch.allclose(logits(merged), logits(unmerged), atol=1e-4)  # merged weights = base + adapter

    plan = base.generate([case], 1, seed=3)[0][0].plan
    draw = lambda model: np.asarray(model.renderer.render([case.references], [plan], [case.instruction], [case.categories], [5], 64, 64)[0], float)  # noqa: E731
    assert np.abs(draw(base) - draw(merged)).max() > 0  # the adapter changes the image
    assert np.abs(draw(merged) - draw(unmerged)).max() <= 2  # fused = unfused, up to rounding
    made = merged.generate([case], 2, seed=7)[0]
    assert [c.index for c in made] == [0, 1] and made[0].plan_seed != made[1].plan_seed and made[0].image.size == (64, 64)
    assert [c.render_seed for c in merged.generate([case], 2, seed=7)[0]] == [c.render_seed for c in made]  # seeds recorded, stable


def test_the_stream_resumes_at_any_position_and_shuffles_per_epoch(tmp_path):
    from music_model.music.training import PublishedStream

    stream = PublishedStream(write_published(tmp_path / "two-files", samples=10, files=2))
    assert stream.size == 10 and len(stream.blocks) == 4  # row groups of 3: 3+2 rows in each file
    full = [(epoch, offset, row["id"]) for epoch, offset, row in stream.rows(7, 0, 0, 3)]
    assert len(full) == 30 and [o for e, o, _ in full if e == 0] == list(range(1, 11))
    epochs = [[i for e, _, i in full if e == k] for k in range(3)]
    assert all(sorted(ids) == sorted(epochs[0]) for ids in epochs) and epochs[0] != epochs[1]  # each epoch: every row once, new order
    for epoch, offset in ((0, 4), (1, 0), (1, 9), (2, 10)):
        suffix = [(e, o, row["id"]) for e, o, row in stream.rows(7, epoch, offset, 3)]
        assert suffix == full[epoch * 10 + offset :]
    assert [row["id"] for _, _, row in stream.rows(7, 0, 0, 1)] == epochs[0]  # the same seed, the same order
    other = [row["id"] for _, _, row in stream.rows(8, 0, 0, 1)]
    assert Counter(other) == Counter(epochs[0]) and other != epochs[0]
