"""DreamBench-protocol scoring of N generated images against their subjects' photos: our batched
scorer against a straightforward per-pair loop, in the same run, on the same models.

    python benchmarks/bench_scoring.py [--generated 200] [--models tiny|full] [--device cpu|cuda]

- batched: `music_model.scoring.dreambench.score_generated`: every image decoded once and embedded once per
  model in batches, pair scores read off a cosine matrix.
- per-pair loop (the baseline of the ratios), as research scripts do: for every generated x real
  pair, open both files, embed both images (batch of 1), take the cosine; CLIP-T embeds the prompt
  for every image.
- per-pair loop, decoded once: the same loop on images already in memory, to separate the decoding
  from the model calls in the saving.

"Generated" images are deterministic random crops, flips and colour shifts of the DreamBench photos
(512 px JPEGs, named by the convention), 4-6 per prompt cell spread over the subjects: the scoring
work is what is measured, not generation. `--models tiny` uses the zoo's tiny DINO / CLIP (the
protocol's preprocessing dominates); `--models full` builds randomly initialised models of the real
sizes (ViT-S/16 DINO, CLIP ViT-B/32) so model compute is realistic. Model loading is outside the
timings. Max |diff| is over every per-image DINO, CLIP-I and CLIP-T value, batched vs loop."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from music_model.scoring.dreambench import generated_path, load_dreambench, scan_generated, score_generated  # noqa: E402
from music_model.scoring.metrics import Scorer  # noqa: E402


def make_generated(bench, folder: Path, count: int, seed: int = 0) -> None:
    """`count` images cycling over subjects and prompts: augmented copies of the subject's photos."""
    rng = np.random.default_rng(seed)
    subjects = list(bench.subjects.values())
    for i in range(count):
        subject = subjects[i % len(subjects)]
        prompt, sample = (i // len(subjects)) % 25, i // (len(subjects) * 25)
        photo = Image.open(subject.references[i % len(subject.references)]).convert("RGB")
        side = photo.width * rng.uniform(0.6, 0.95)
        left, top = rng.uniform(0, photo.width - side), rng.uniform(0, photo.height - side)
        image = photo.crop((int(left), int(top), int(left + side), int(top + side))).resize((512, 512), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
        path = generated_path(folder, subject.name, prompt, sample, "jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=92)


def build_full_size(folder: Path) -> tuple[str, str]:
    """Randomly initialised facebook/dino-vits16 and openai/clip-vit-base-patch32 shapes, saved in
    their real formats so the roles load them as they load the hub checkpoints."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, ViTConfig, ViTModel

    from music_model.zoo.tokenizers import write_clip_tokenizer

    torch.manual_seed(0)
    dino, clip = folder / "dino-vits16-random", folder / "clip-vit-b32-random"
    if not (dino / "config.json").exists():
        config = ViTConfig(image_size=224, patch_size=16, hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6)
        ViTModel(config, add_pooling_layer=False).save_pretrained(dino)
    if not (clip / "config.json").exists():
        clip.mkdir(parents=True, exist_ok=True)
        write_clip_tokenizer(clip)
        tokenizer = CLIPTokenizer.from_pretrained(clip)
        config = CLIPConfig(projection_dim=512, vision_config=dict(image_size=224, patch_size=32),
                            text_config=dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        CLIPModel(config).save_pretrained(clip)
        CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(clip)
    return str(dino), str(clip)


def per_pair_loop(scorer: Scorer, bench, images, load) -> dict[tuple, tuple[float, float, float]]:
    """The straightforward loop: for every generated x real pair, embed both images."""
    scores = {}
    for item in images:
        dino, clip_i = [], []
        for reference in bench.subjects[item.subject].references:
            generated, real = load(item.path), load(reference)
            a, b = scorer.embed_images([generated]), scorer.embed_images([real])
            dino.append(float(a.dino[0] @ b.dino[0]))
            clip_i.append(float(a.clip[0] @ b.clip[0]))
        text = scorer.embed_texts([bench.prompt(item.subject, item.prompt_index)])[0]
        clip_t = float(scorer.embed_images([load(item.path)]).clip[0] @ text)
        scores[(item.subject, item.prompt_index, item.sample)] = (float(np.mean(dino)), float(np.mean(clip_i)), clip_t)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generated", type=int, default=200)
    parser.add_argument("--bench", type=Path, default=ROOT / "tests" / "data" / "dreambench")
    parser.add_argument("--models", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    os.environ.setdefault("MUSIC_HOME", str(work / "home"))  # the zoo builds there when it is not built yet

    bench = load_dreambench(args.bench)
    folder = work / "generated"
    shutil.rmtree(folder, ignore_errors=True)
    make_generated(bench, folder, args.generated)
    scan = scan_generated(bench, folder)
    dino_model, clip_model = ("zoo:dino_vits16", "zoo:clip_b32") if args.models == "tiny" else build_full_size(work / "models")
    common = {"device": args.device, "dtype": "float32", "batch_size": args.batch_size}
    scorer = Scorer.from_specs({"role": "dino", "backend": "transformers", "model": dino_model, **common},
                               {"role": "clip", "backend": "transformers", "model": clip_model, **common})
    score_generated(scorer, bench, scan.images[:2])  # warm-up (first-call allocations), outside the timings

    def timed(run):
        if args.device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = run()
        if args.device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
        return result, time.perf_counter() - start

    (rows, drops), batched_s = timed(lambda: score_generated(scorer, bench, scan.images))
    assert not drops and len(rows) == len(scan.images)
    batched = {(r["subject"], r["prompt_index"], r["sample"]): (r["dino"], r["clip_i"], r["clip_t"]) for r in rows}
    open_file = lambda path: Image.open(path).convert("RGB")  # noqa: E731  (the loop reads files as research scripts do)
    loop, loop_s = timed(lambda: per_pair_loop(scorer, bench, scan.images, open_file))
    decoded = {p: open_file(p) for p in {i.path for i in scan.images} | {r for s in bench.subjects.values() for r in s.references}}
    loop_mem, loop_mem_s = timed(lambda: per_pair_loop(scorer, bench, scan.images, decoded.__getitem__))
    # On a shared machine the load drifts during the long loops: time the batched scorer again after
    # them and rate it by the mean of both runs (both are printed).
    _, batched_after_s = timed(lambda: score_generated(scorer, bench, scan.images))
    batched_first_s, batched_s = batched_s, (batched_s + batched_after_s) / 2

    pairs = sum(len(bench.subjects[i.subject].references) for i in scan.images)
    references = sum(len(bench.subjects[s].references) for s in {i.subject for i in scan.images})
    diff = max(abs(a - b) for key in batched for a, b in zip(batched[key], loop[key]))
    diff_mem = max(abs(a - b) for key in batched for a, b in zip(batched[key], loop_mem[key]))
    print(f"{len(scan.images)} generated images x {references} reference photos ({pairs} generated x real pairs), "
          f"models: {dino_model}, {clip_model} on {args.device}, batch {args.batch_size}")
    print(f"{'method':34s} {'seconds':>8s} {'images/s':>9s} {'image forwards':>15s} {'speed-up':>9s} {'max |diff|':>11s}")
    loop_forwards = 4 * pairs + len(scan.images)  # DINO and CLIP of both images per pair, CLIP of each image for CLIP-T
    for name, seconds, forwards, difference in (
        ("per-pair loop (baseline)", loop_s, loop_forwards, None),
        ("per-pair loop, decoded once", loop_mem_s, loop_forwards, diff_mem),
        ("batched (ours), mean of 2 runs", batched_s, 2 * (len(scan.images) + references), diff),
    ):
        shown = "-" if difference is None else f"{difference:.2e}"
        print(f"{name:34s} {seconds:8.2f} {len(scan.images) / seconds:9.1f} {forwards:15d} {loop_s / seconds:8.1f}x {shown:>11s}")
    print(f"max |batched - loop| over every DINO, CLIP-I, CLIP-T value: {diff:.2e} (loop decoded once: {diff_mem:.2e}); "
          f"speed-up {loop_s / batched_s:.1f}x vs the loop, {loop_mem_s / batched_s:.1f}x vs the loop on decoded images "
          f"(batched: {batched_first_s:.2f} s before the loops, {batched_after_s:.2f} s after)")


if __name__ == "__main__":
    main()
