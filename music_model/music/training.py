"""LoRA training of the MUSIC model: the planner (Qwen2.5-VL) and the renderer (FLUX.1 Kontext), each
with a peft LoRA adapter, on a published training set streamed from its Parquet files.

- Planner loss: cross-entropy on the plan text's tokens (CoT + layout, and the end-of-turn token)
  only; the prompt and image tokens are labelled -100.
- Renderer loss: FLUX Kontext's rectified-flow loss (`renderer.flow_matching_loss`) on (subject
  references placed by the sample's layout -> canvas, CoT-enriched prompt, the sample's image).
- Step loss = w_planner x planner + w_renderer x renderer (0.5 / 0.5), averaged over the
  micro-batches of a step (gradient accumulation); one AdamW over both adapters, global norm clip.
  The two adapters share no parameters, so with AdamW the weights mostly rescale what the clip sees
  and the reported total; a weight of 0 leaves that model out of training.
- On CUDA the base weights are bfloat16 (the roles' default) and run under bf16 autocast; LoRA
  weights stay float32.

Data order: an epoch visits the Parquet row groups in a seeded random order and each group's rows in
a seeded random order, reading one row group at a time (streaming; memory is one group). The
position (epoch, rows consumed) is known from the metadata alone, so a resume seeks without reading
the rows it skips.

Checkpoints: every `checkpoint_every` steps `<run>/checkpoints/step-XXXXXXXX/` holds both adapters,
the optimizer and schedule, the torch RNG states, the data position and the loss history, written
to a temporary folder and renamed (a kill leaves either a whole checkpoint or none). A run started
again resumes from the newest one; each step's noise and timesteps come from a generator seeded by
(seed, step, micro-batch), so the losses after a resume equal those of an uninterrupted run (bit for
bit on the CPU; on CUDA up to the nondeterminism of some backward kernels, unless
`torch.use_deterministic_algorithms(True)` is set).

Outputs in `<output_root>/<name>/`: `adapter/planner` (peft), `adapter/renderer` (diffusers LoRA),
`losses.jsonl` (one record per step), `summary.json`, `spec.yaml`, checkpoints.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image, ImageOps

from safe_files import staged_folder, write_text
from data_specs.train import RESUMABLE_CHANGES, TrainSpec
from music_model.media.images import from_struct
from music_model.music.plan import Plan, PlanBounds, PlanError, format_plan, plan_from_sample
from music_model.music.planner import Planner, drop_peft_checkpointing_warning
from music_model.music.renderer import flow_matching_loss, layout_canvas, note_clip_cut, quiet_prompt_truncation, render_prompt

COLUMNS = ["id", "num_subjects", "image", "instruction", "cot", "layout", "categories", "references"]
IGNORE_INDEX = -100
CHECKPOINTS = "checkpoints"


def stable_seed(*parts) -> int:
    """A 63-bit seed from `parts`, the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()[:8], "little") >> 1


def plan_bounds(spec: TrainSpec) -> PlanBounds:
    p = spec.plan
    return PlanBounds(p.max_relations, p.max_field_words, p.max_word_chars, p.grid)


# --- data ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One published training sample, decoded, with its target plan."""

    id: str
    image: Image.Image
    references: list[Image.Image]
    instruction: str
    categories: list[str]
    plan: Plan


def decode_sample(row: dict, grid: int) -> Sample:
    """A published row as a training sample; PlanError when its CoT and layout make no plan."""
    n = len(row["references"])
    if n != row["num_subjects"] or len(row["categories"]) != n:
        raise PlanError(f"{n} references, {len(row['categories'])} categories for {row['num_subjects']} subjects")
    plan, _ = plan_from_sample(row["cot"], row["layout"], n, row["categories"], grid)
    return Sample(row["id"], from_struct(row["image"]), [from_struct(r) for r in row["references"]], row["instruction"],
                  list(row["categories"]), plan)


class PublishedStream:
    """A published dataset's rows in a seeded, block-shuffled order, one row group in memory."""

    def __init__(self, dataset: str | Path):
        files = sorted((Path(dataset) / "data").glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no published Parquet under {Path(dataset) / 'data'}")
        self.blocks: list[tuple[Path, int, int]] = []
        for path in files:
            file = pq.ParquetFile(path)
            metadata = file.metadata
            missing = [c for c in COLUMNS if c not in file.schema_arrow.names]
            if missing:
                raise ValueError(f"{path}: not a published MUSIC dataset (missing columns {', '.join(missing)})")
            self.blocks += [(path, g, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups)]
        self.size = sum(rows for _, _, rows in self.blocks)
        if self.size == 0:
            raise ValueError(f"{dataset}: the published dataset has no rows")

    def order(self, seed: int, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The epoch's (block, row permutation) list."""
        blocks = np.random.default_rng([seed, epoch]).permutation(len(self.blocks))
        return [(int(b), np.random.default_rng([seed, epoch, int(b)]).permutation(self.blocks[b][2])) for b in blocks]

    def rows(self, seed: int, epoch: int, offset: int, epochs: int) -> Iterator[tuple[int, int, dict]]:
        """(epoch, rows of that epoch consumed once this one is, row) from position (epoch, offset)
        to the end of epoch `epochs - 1`."""
        while epoch < epochs:
            position = 0  # rows of this epoch in the blocks before the current one
            for block, permutation in self.order(seed, epoch):
                size = len(permutation)
                if position + size > offset:
                    path, group, _ = self.blocks[block]
                    table = pq.ParquetFile(path).read_row_group(group, columns=COLUMNS)
                    for k in range(max(offset - position, 0), size):
                        yield epoch, position + k + 1, table.slice(int(permutation[k]), 1).to_pylist()[0]
                position += size
            epoch, offset = epoch + 1, 0


# --- the two trainable models -------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


class PlannerTrainer:
    """The planner's VLM with a LoRA adapter on its language model, and its masked CE loss. `vlm`:
    an already loaded `vlm` role to train instead of loading the spec's (its model is modified)."""

    def __init__(self, spec: TrainSpec, vlm=None):
        from peft import LoraConfig, get_peft_model

        from music_model.roles.vlm import TransformersVLM

        vlm = vlm or TransformersVLM(spec.planner)
        self.planner = Planner(vlm, plan_bounds(spec))
        self.max_seq_len = spec.plan.max_seq_len
        vlm.model.requires_grad_(False)
        config = LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                            target_modules=spec.lora.planner_targets)
        drop_peft_checkpointing_warning()
        self.model = get_peft_model(vlm.model, config)
        if spec.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.device, self.dtype = vlm.device, vlm.dtype
        self.pad_id = vlm.decoder.pad_id

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def example(self, sample: Sample) -> dict[str, torch.Tensor]:
        """Prompt (chat template + image tokens) followed by the plan text and the end-of-turn token;
        labels are -100 on the prompt. ValueError when it is longer than `max_seq_len`."""
        planner = self.planner
        prompt = planner.encode([sample.references], [sample.instruction], [sample.categories])
        target = planner.vlm.processor.tokenizer(format_plan(sample.plan), add_special_tokens=False)["input_ids"]
        target = torch.tensor(target + [planner.end_token_id], dtype=torch.long)
        length = prompt["input_ids"].shape[1] + len(target)
        if length > self.max_seq_len:
            raise ValueError(f"{length} tokens > plan.max_seq_len={self.max_seq_len}")
        example = {}
        for key, value in prompt.items():
            if torch.is_tensor(value) and value.dim() == 2 and value.shape == prompt["input_ids"].shape:
                fill = target if key == "input_ids" else torch.ones_like(target) if key == "attention_mask" else torch.zeros_like(target)
                example[key] = torch.cat([value[0], fill])
            else:
                example[key] = value
        example["labels"] = torch.cat([torch.full((prompt["input_ids"].shape[1],), IGNORE_INDEX), target])
        return example

    def collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-padded token tensors; image tensors concatenated in sample order."""
        length = max(e["input_ids"].shape[0] for e in examples)
        batch = {}
        for key in examples[0]:
            if examples[0][key].dim() == 1:  # per-token
                fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}.get(key, 0)
                batch[key] = torch.stack([torch.nn.functional.pad(e[key], (0, length - e[key].shape[0]), value=fill) for e in examples])
            else:
                batch[key] = torch.cat([e[key] for e in examples])
        return batch

    def loss(self, samples: list[Sample], skipped: Counter) -> torch.Tensor | None:
        """Mean cross-entropy over the plan tokens of the samples that fit `max_seq_len`. Logits are
        computed only from the first plan position on (`logits_to_keep`): prompt and image positions
        carry no loss, and a real vocabulary's logits over them would dominate memory."""
        examples = []
        for sample in samples:
            try:
                examples.append(self.example(sample))
            except ValueError:
                skipped["planner: longer than plan.max_seq_len"] += 1
        if not examples:
            return None
        batch = {k: v.to(self.device) for k, v in self.collate(examples).items()}
        labels = batch.pop("labels")
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        length = labels.shape[1]
        first_target = int((labels != IGNORE_INDEX).float().argmax(dim=1).min())
        keep = length - first_target + 1  # logits at positions first_target - 1 .. length - 1
        with _autocast(self.device, self.dtype):
            logits = self.model(**batch, logits_to_keep=keep).logits
        targets = labels[:, length - keep + 1 :]
        return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=IGNORE_INDEX)

    def state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return _adapter_tensors(get_peft_model_state_dict(self.model))

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"planner checkpoint holds unexpected keys {result.unexpected_keys[:3]}")

    def save_adapter(self, folder: Path) -> None:
        self.model.save_pretrained(str(folder))


class RendererTrainer:
    """The renderer's FLUX Kontext pipeline with a LoRA adapter on its transformer, and its
    flow-matching loss on (layout canvas, CoT-enriched prompt, target image). `editor`: an already
    loaded `editor` role to train instead of loading the spec's (its pipeline is modified)."""

    def __init__(self, spec: TrainSpec, editor=None):
        from peft import LoraConfig

        from music_model.roles.editor import DiffusersEditor

        self.editor = editor or DiffusersEditor(spec.renderer)
        self.pipeline = self.editor.pipeline
        quiet_prompt_truncation(self.pipeline)
        self.params = spec.render
        self.width, self.height = self.editor.check_size(spec.render.width, spec.render.height)
        self.background = (spec.render.background,) * 3
        for component in self.pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
        transformer = self.pipeline.transformer
        transformer.add_adapter(LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                                           init_lora_weights="gaussian", target_modules=list(spec.lora.renderer_targets)))
        for parameter in transformer.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()  # LoRA weights train in float32 beside bf16 base weights
        if spec.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        self.device, self.dtype = self.editor.device, self.editor.dtype

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.pipeline.transformer.parameters() if p.requires_grad]

    def images(self, images: list[Image.Image]) -> torch.Tensor:
        fitted = [ImageOps.fit(image.convert("RGB"), (self.width, self.height), Image.Resampling.BICUBIC) for image in images]
        return self.pipeline.image_processor.preprocess(fitted, height=self.height, width=self.width)

    def loss(self, samples: list[Sample], generator: torch.Generator) -> torch.Tensor:
        canvases = [layout_canvas(s.references, s.plan, self.width, self.height, self.background) for s in samples]
        prompts = [render_prompt(s.instruction, s.plan, s.categories) for s in samples]
        note_clip_cut(self.pipeline, prompts, "train")
        p = self.params
        with _autocast(self.device, self.dtype):
            return flow_matching_loss(self.pipeline, self.images([s.image for s in samples]), self.images(canvases), prompts,
                                      generator, self.device, self.dtype, p.guidance_scale, p.max_sequence_length,
                                      p.weighting_scheme, p.logit_mean, p.logit_std)

    def state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return _adapter_tensors(get_peft_model_state_dict(self.pipeline.transformer))

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.pipeline.transformer, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"renderer checkpoint holds unexpected keys {result.unexpected_keys[:3]}")

    def save_adapter(self, folder: Path) -> None:
        from peft import get_peft_model_state_dict

        transformer = self.pipeline.transformer
        # The LoRA config (rank, alpha, targets) goes into the file's metadata, as diffusers' training
        # scripts save it: without it, loading assumes alpha = rank and any other alpha loads at the wrong strength.
        type(self.pipeline).save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(transformer),
                                              transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())


# --- checkpoints ----------------------------------------------------------------------------------------


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary folder left by a kill is not one)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists())


def save_checkpoint(run_dir: Path, trainers: dict, optimizer, schedule, state: dict, keep: int) -> Path:
    from safetensors.torch import save_file

    root = run_dir / CHECKPOINTS
    final = root / f"step-{state['step']:08d}"
    with staged_folder(final) as staging:
        for name, trainer in trainers.items():
            save_file(trainer.state(), str(staging / f"{name}.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, staging / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, staging / "rng.pt")
        (staging / "state.json").write_text(json.dumps(state))
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, trainers: dict, optimizer, schedule) -> dict:
    from safetensors.torch import load_file

    for name, trainer in trainers.items():
        trainer.load_state(load_file(str(folder / f"{name}.safetensors")))
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    rng = torch.load(folder / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((folder / "state.json").read_text())


# --- the loop -------------------------------------------------------------------------------------------


def set_cuda_attention(spec: TrainSpec) -> None:
    """PyTorch's cuDNN SDPA backward has open bugs on H100/H200 (NaN grad_q: pytorch#196678; reads out
    of bounds for some strides: pytorch#169849); unless the spec allows it, training runs attention on
    the flash / memory-efficient SDPA kernels. A process-wide switch, set for the training process."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(spec.cudnn_attention)


def total_steps(spec: TrainSpec, dataset_size: int) -> int:
    steps = math.ceil(spec.epochs * dataset_size / (spec.micro_batch_size * spec.grad_accum))
    return min(steps, spec.max_steps) if spec.max_steps else steps


def _write_history(path: Path, history: list[dict]) -> None:
    write_text(path, "".join(json.dumps(record) + "\n" for record in history))


def train(spec: TrainSpec, on_step: Callable[[dict], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) the run `<output_root>/<name>`; returns its summary. `on_step` is called
    with every step's record (step, epoch, samples, planner, renderer, loss, lr, seconds)."""
    dataset = spec.dataset_dir()
    run_dir = spec.out_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    stream = PublishedStream(dataset)
    steps = total_steps(spec, stream.size)
    set_cuda_attention(spec)
    torch.manual_seed(spec.seed)
    weights = spec.loss_weights
    trainers: dict = {}
    if weights.planner > 0:
        trainers["planner"] = PlannerTrainer(spec)
    if weights.renderer > 0:
        trainers["renderer"] = RendererTrainer(spec)
    groups = [{"params": trainer.parameters()} for trainer in trainers.values()]
    o = spec.optim
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    warmup = o.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    state = {"step": 0, "epoch": 0, "offset": 0, "samples": 0, "skipped": {}, "history": [], "step_hash": spec.step_hash()}
    checkpoints = checkpoint_dirs(run_dir)
    resumed_from = None
    if checkpoints:
        saved = json.loads((checkpoints[-1] / "state.json").read_text())
        if saved["step_hash"] != state["step_hash"]:
            raise ValueError(f"{checkpoints[-1]} was written under another training spec (only {', '.join(RESUMABLE_CHANGES)} "
                             "may change before a resume); use a new name or remove the run folder")
        state = load_checkpoint(checkpoints[-1], trainers, optimizer, schedule)
        resumed_from = checkpoints[-1].name
        log(f"resumed from {checkpoints[-1]} at step {state['step']} (epoch {state['epoch']}, row {state['offset']})")
    history_path = run_dir / "losses.jsonl"
    _write_history(history_path, state["history"])  # drops records of steps after the checkpoint: they are redone
    skipped = Counter(state["skipped"])
    rows = stream.rows(spec.seed, state["epoch"], state["offset"], spec.epochs)
    started = time.perf_counter()
    with history_path.open("a") as history_file:
        while state["step"] < steps:
            step_start = time.perf_counter()
            micro_batches = [batch for batch in (list(islice(rows, spec.micro_batch_size)) for _ in range(spec.grad_accum)) if batch]
            if not micro_batches:
                break
            optimizer.zero_grad(set_to_none=True)
            losses: dict[str, list[float]] = {name: [] for name in trainers}
            for m, batch in enumerate(micro_batches):
                samples = []
                for _, _, row in batch:
                    try:
                        samples.append(decode_sample(row, spec.plan.grid))
                    except PlanError as error:
                        skipped[f"no plan: {error}"[:120]] += 1
                if not samples:
                    continue
                if "planner" in trainers:
                    loss = trainers["planner"].loss(samples, skipped)
                    if loss is not None:
                        (weights.planner * loss / len(micro_batches)).backward()
                        losses["planner"].append(loss.item())
                if "renderer" in trainers:
                    generator = torch.Generator("cpu").manual_seed(stable_seed(spec.seed, "renderer", state["step"], m))
                    loss = trainers["renderer"].loss(samples, generator)
                    (weights.renderer * loss / len(micro_batches)).backward()
                    losses["renderer"].append(loss.item())
            if o.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], o.max_grad_norm)
            lr = schedule.get_last_lr()[0]
            optimizer.step()
            schedule.step()
            epoch, offset, _ = micro_batches[-1][-1]
            epoch, offset = (epoch + 1, 0) if offset >= stream.size else (epoch, offset)
            state.update(step=state["step"] + 1, epoch=epoch, offset=offset,
                         samples=state["samples"] + sum(len(b) for b in micro_batches), skipped=dict(skipped))
            record = {"step": state["step"], "epoch": epoch, "samples": state["samples"], "lr": lr,
                      "seconds": round(time.perf_counter() - step_start, 4)}
            total = 0.0
            for name in ("planner", "renderer"):
                value = float(np.mean(losses[name])) if losses.get(name) else None
                record[name] = value
                total += getattr(weights, name) * value if value is not None else 0.0
            record["loss"] = total
            state["history"].append(record)
            history_file.write(json.dumps(record) + "\n")
            history_file.flush()
            if on_step:
                on_step(record)
            if state["step"] % spec.checkpoint_every == 0 or state["step"] == steps:
                save_checkpoint(run_dir, trainers, optimizer, schedule, state, spec.keep_checkpoints)
    adapters = {}
    for name, trainer in trainers.items():
        folder = run_dir / "adapter" / name
        shutil.rmtree(folder, ignore_errors=True)
        trainer.save_adapter(folder)
        adapters[name] = str(folder)
    summary = {
        "name": spec.name, "output": str(run_dir), "dataset": str(dataset), "dataset_rows": stream.size, "steps": state["step"],
        "total_steps": steps, "samples": state["samples"], "epochs": spec.epochs, "resumed_from": resumed_from,
        "skipped": dict(skipped), "adapters": adapters, "loss_weights": weights.model_dump(),
        "lora": {"rank": spec.lora.rank, "alpha": spec.lora.alpha}, "lr": o.lr,
        "trainable_parameters": {name: sum(p.numel() for p in t.parameters()) for name, t in trainers.items()},
        "first": state["history"][0] if state["history"] else None, "last": state["history"][-1] if state["history"] else None,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def read_history(run_dir: str | Path) -> list[dict]:
    """The loss records of a run, one per step."""
    path = Path(run_dir) / "losses.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
