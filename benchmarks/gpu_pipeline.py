"""A small training-set build at real size on one GPU: every stage with the real architectures.

The build is `music_10k.yaml` (1024 px targets, 28 steps, its batch sizes and decoding options)
with each model replaced by its `arch:` twin (`music_model.zoo.arch`: the published architecture,
random weights built on the GPU in bf16) and a few sources. Stages run through the project's own
per-shard entry (`tasks.build_tasks.run_stage_shard`: stage-scoped residency, then
`tasks.engine.contract.run_shard`) without Prefect, so no server is needed; publish runs at the end.
Random models produce noise, so the thresholds that judge content are opened (every sample flows
through every stage) and generated texts run to their schema's bounds: LLM/VLM times are upper
bounds of what real checkpoints, which stop early, take.

Per stage it prints items/s (the stage's work unit: rows, subjects or source images, as
`Stage.unit`), model-call and load seconds and the peak accelerator memory (reset per
stage); beside each model call, the same model in a plain diffusers / transformers loop on the first
`--plain-batches` batches of the same inputs (the ratio is ours / plain throughput: >= 1 means the
pipeline costs nothing over a hand-written loop; generation compares tokens/s, since the plain loop
samples without the grammar); seconds per 1024 px FLUX image and its fraction of the GPU's dense
bf16 peak; and the projected GPU-hours of `music_10k.yaml` on this GPU from the measured rates and
the spec's funnel (`tasks.checks.cost_plan`). The JSON result is what `music plan --bench` reads. First,
on every visible GPU, it checks that a shard thread holding that GPU's slot runs with it as the
current CUDA device and stream, and that xgrammar's mask kernel gives the CPU kernel's result there.

    python benchmarks/gpu_pipeline.py --out /tmp/gpu_pipeline.json        # one GPU, <= 8 minutes
    music plan data_specs/music_10k.yaml --bench /tmp/gpu_pipeline.json
    python benchmarks/gpu_pipeline.py --tiny                                # the same code, tiny, on the CPU
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_specs.build import BuildSpec  # noqa: E402
from data_specs.roles import model_kind  # noqa: E402
from music_model.zoo.arch import ARCH_BY_HUB_ID, ARCHES, TINY_SUFFIX  # noqa: E402
from tasks.stages import load_build_spec, parse_build_spec  # noqa: E402

# Dense (not sparse) bf16 tensor-core peaks from the vendors' data sheets, TFLOPS; first match wins.
DENSE_BF16_TFLOPS = (("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                     ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.2))
# Qwen's recommended sampling (non-thinking), for the plain generation loop.
PLAIN_SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8}


def dense_bf16_tflops(device_name: str) -> float | None:
    for name, tflops in DENSE_BF16_TFLOPS:
        if name in device_name:
            return tflops
    return None


def flux_forward_flops(config: Any, image_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one FLUX transformer forward over `image_tokens` + `text_tokens`. Each token
    passes 12 d^2 weights per block (double blocks route image and text tokens through separate
    streams of qkv 3d^2 + out d^2 + MLP 8d^2; single blocks: 7d^2 in, 5d^2 out) and attention costs
    4 L^2 d per block; the adaLN modulation acts on the timestep embedding only (negligible). At
    1024 px (4096 + 512 tokens) that is ~74 TFLOP a step, ~2.1 PFLOP an image at 28 steps: counting
    every parameter for every token (2 P L, ~125 TFLOP a step) overstates the work by ~70%."""
    width = config.num_attention_heads * config.attention_head_dim
    tokens = image_tokens + text_tokens
    blocks = config.num_layers + config.num_single_layers
    return blocks * (2 * 12 * width * width * tokens + 4 * tokens * tokens * width)


# --- the build spec ---

def bench_spec(tiny: bool, sources: int, subjects: int, device: str, output_root: Path) -> BuildSpec:
    """`music_10k.yaml` (or `tiny.yaml`) with arch models on `device`, `sources` sources of
    `subjects` subjects in one shard, and the content thresholds opened for random models."""
    base = load_build_spec("tiny.yaml" if tiny else "music_10k.yaml").model_dump()
    by_zoo = {arch.zoo: name for name, arch in ARCHES.items()}
    roles = {}
    for name, role in base["roles"].items():
        model = role["model"]
        arch = by_zoo.get(model.removeprefix("zoo:")) if model_kind(model) == "zoo" else ARCH_BY_HUB_ID.get(model)
        if arch is None:
            raise SystemExit(f"roles.{name}: {model} has no arch entry (music_model/zoo/arch.py)")
        dtype = "float32" if device == "cpu" else role["dtype"]  # the spec's: auto (bf16) for the generators, float32 for the helpers
        roles[name] = {**role, "model": f"arch:{arch}{TINY_SUFFIX if tiny else ''}", "device": device, "dtype": dtype}
    opened = {
        "compose": {**base["compose"], "require_plausible": False, "require_named": False},
        "detect": {**base["detect"], "min_box_area": 0.0, "box_threshold": 0.0, "text_threshold": 0.0},
        "verify": {**base["verify"], "require_match": False},
        "rerender": {**base["rerender"], "min_dino": -1.0, "max_dino": 1.0},
        "filter": {**base["filter"], "near_duplicate_clip": 1.0001},
    }
    return parse_build_spec({**base, **opened, "name": "gpu_pipeline", "num_source_images": sources, "shard_size": sources,
                             "subject_counts": {subjects: 1}, "output_root": str(output_root), "roles": roles},
                            source="gpu_pipeline spec")


# --- the device check: a shard thread's current device is its slot's ---

def device_check() -> list[dict[str, Any]]:
    """For every visible GPU (the CPU slot without one): a fresh thread (threads start on CUDA device
    0) takes that GPU's device slot as a shard does and reports its current device and stream, then
    masks logits on the GPU with xgrammar's kernel (Triton launches on the current device) and
    compares them with the CPU kernel's. A slot that left device 0 current would launch the kernel
    on GPU 0 against another GPU's memory: an illegal access, or logits left unmasked."""
    from concurrent.futures import ThreadPoolExecutor

    import xgrammar as xgr

    from music_model.roles.kernels import bitmask_backend
    from music_model.roles.slots import device_current, device_slot, machine_slots

    def in_slot(slot) -> dict[str, Any]:
        with device_slot([slot], {"what": f"device-check {slot.device}"}):
            device = torch.device(slot.device)
            row: dict[str, Any] = {"device": slot.device, "slot": slot.name}
            if device.type == "cuda":
                row["current_device"] = torch.cuda.current_device()
                row["stream_device"] = torch.cuda.current_stream().device.index
            generator = torch.Generator().manual_seed(0)
            logits = torch.randn(4, 1000, generator=generator)
            bitmask = torch.randint(-2**31, 2**31 - 1, (4, 32), dtype=torch.int32, generator=generator)
            expected = logits.clone()
            xgr.apply_token_bitmask_inplace(expected, bitmask)
            masked = logits.to(device)
            row["mask_backend"] = bitmask_backend(device.type)
            with device_current(device):
                xgr.apply_token_bitmask_inplace(masked, bitmask.to(device), backend=row["mask_backend"])
            row["mask_ok"] = torch.equal(masked.cpu(), expected)
            index = device.index if device.type == "cuda" else None
            row["ok"] = row["mask_ok"] and row.get("current_device") == index and row.get("stream_device") == index
            return row

    previous = os.environ.get("MUSIC_SLOT_DIR")
    with tempfile.TemporaryDirectory(prefix="music-device-check-") as folder:
        os.environ["MUSIC_SLOT_DIR"] = folder  # its own slots: never waits for a build's
        try:
            rows = []
            for slot in machine_slots(1):
                with ThreadPoolExecutor(1) as pool:
                    rows.append(pool.submit(in_slot, slot).result())
        finally:
            if previous is None:
                del os.environ["MUSIC_SLOT_DIR"]
            else:
                os.environ["MUSIC_SLOT_DIR"] = previous
    return rows


def print_device_check(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        current = "" if "current_device" not in row else f"current device {row['current_device']}, stream on {row['stream_device']}, "
        print(f"device check {row['device']:7s} {current}mask {'ok' if row['mask_ok'] else 'WRONG'} ({row['mask_backend']}): "
              f"{'ok' if row['ok'] else 'FAILED'}", flush=True)


# --- the stages' model calls, recorded ---

@dataclass
class Call:
    stage: str
    role: Any
    method: str
    arguments: dict[str, Any]
    result: Any
    seconds: float


@contextlib.contextmanager
def recording(calls: list[Call]):
    """Record every model call the stages make through `StageContext.timed` (their one entry to a
    model), so the plain loops replay the same inputs."""
    from tasks.engine.contract import StageContext

    timed = StageContext.timed

    def recorded(self, method, *args, **kwargs):
        start = time.perf_counter()
        result = timed(self, method, *args, **kwargs)
        arguments = inspect.signature(method).bind(*args, **kwargs).arguments
        calls.append(Call(self.stage.name, method.__self__, method.__name__, dict(arguments), result, time.perf_counter() - start))
        return result

    StageContext.timed = recorded
    try:
        yield
    finally:
        StageContext.timed = timed


# --- the same models in plain library loops ---

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens_until_end(new_tokens: torch.Tensor, stop_ids: list[int]) -> int:
    """Generated tokens per row up to and including the first end token."""
    count = 0
    for row in new_tokens.tolist():
        ends = [i for i, token in enumerate(row) if token in stop_ids]
        count += ends[0] + 1 if ends else len(row)
    return count


def plain_generate(role: Any, arguments: dict, items: int) -> tuple[int, int]:
    """transformers `generate` with sampling, no grammar, as long as our longest output; (items, tokens)."""
    vlm = role.spec.role == "vlm"
    tokenizer = role.processor.tokenizer if vlm else role.tokenizer
    prompts, system = arguments["prompts"], arguments.get("system")
    budget = max(len(tokenizer(r.text, add_special_tokens=False).input_ids) for r in arguments["_result"]) + 1
    stop = role.model.generation_config.eos_token_id
    stop_ids = [stop] if isinstance(stop, int) else list(stop or [])
    tokens = 0
    for start in range(0, items, role.batch_size):
        rows = range(start, min(start + role.batch_size, items))
        if vlm:
            images = arguments["images"]
            texts = [role.chat_text(len(images[i]), prompts[i], system) for i in rows]
            batch = role.processor(text=texts, images=[[im.convert("RGB") for im in images[i]] for i in rows], padding=True,
                                   return_tensors="pt", **role.images_kwargs)
        else:
            batch = tokenizer([role.chat_text(prompts[i], system) for i in rows], return_tensors="pt", padding=True,
                              add_special_tokens=False)
        batch = batch.to(role.device)
        output = role.model.generate(**batch, **PLAIN_SAMPLING, max_new_tokens=budget, pad_token_id=tokenizer.pad_token_id)
        tokens += _tokens_until_end(output[:, batch["input_ids"].shape[1]:].cpu(), stop_ids)
    return items, tokens


def plain_forward(role: Any, arguments: dict, items: int) -> tuple[int, int]:
    """The VLM's forward pass over the processor's batches of the same crops and questions, all logits
    kept (what `yes_probability` reads one position of)."""
    images, prompts, system = arguments["images"], arguments["prompts"], arguments.get("system")
    for start in range(0, items, role.batch_size):
        rows = range(start, min(start + role.batch_size, items))
        texts = [role.chat_text(len(images[i]), prompts[i], system) for i in rows]
        batch = role.processor(text=texts, images=[[im.convert("RGB") for im in images[i]] for i in rows], padding=True,
                               return_tensors="pt", **role.images_kwargs).to(role.device)
        with torch.inference_mode():
            role.model(**batch)
    return items, 0


def plain_t2i(role: Any, arguments: dict, items: int) -> tuple[int, int]:
    """The diffusers pipeline called directly with the same prompts, seeds, size and options."""
    prompts, seeds = arguments["prompts"], arguments["seeds"]
    for start in range(0, items, role.batch_size):
        rows = range(start, min(start + role.batch_size, items))
        role.pipeline(prompt=[prompts[i] for i in rows], width=arguments["width"], height=arguments["height"],
                      generator=[torch.Generator("cpu").manual_seed(int(seeds[i])) for i in rows], output_type="pil",
                      **role.call_options)
    return items, 0


def plain_edit(role: Any, arguments: dict, items: int) -> tuple[int, int]:
    """FLUX Kontext called directly, each input at the size our editor rendered it (batched by size)."""
    images, prompts, seeds = arguments["images"], arguments["prompts"], arguments["seeds"]
    sizes = [output.size for output in arguments["_result"][:items]]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(size, []).append(i)
    for (width, height), indices in by_size.items():
        for start in range(0, len(indices), role.batch_size):
            rows = indices[start:start + role.batch_size]
            role.pipeline(image=[ImageOps.fit(images[i].convert("RGB"), (width, height), Image.Resampling.BICUBIC) for i in rows],
                          prompt=[prompts[i] for i in rows], width=width, height=height, max_area=width * height,
                          _auto_resize=False, generator=[torch.Generator("cpu").manual_seed(int(seeds[i])) for i in rows],
                          output_type="pil", **role.call_options)
    return items, 0


def plain_detect(role: Any, arguments: dict, items: int) -> tuple[int, int]:
    """GroundingDINO as its model card runs it: processor, forward, post_process_grounded_object_detection."""
    images, phrases = arguments["images"], arguments["phrases"]
    for start in range(0, items, role.batch_size):
        rows = [i for i in range(start, min(start + role.batch_size, items)) if phrases[i]]
        if not rows:
            continue
        texts = [". ".join(p.lower() for p in phrases[i]) + "." for i in rows]
        inputs = role.processor(images=[images[i].convert("RGB") for i in rows], text=texts, padding="longest",
                                return_tensors="pt").to(role.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(role.dtype)
        outputs = role.model(**inputs)
        box_threshold, text_threshold = arguments.get("box_threshold"), arguments.get("text_threshold")
        role.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=role.box_threshold if box_threshold is None else box_threshold,
            text_threshold=role.text_threshold if text_threshold is None else text_threshold,
            target_sizes=[images[i].size[::-1] for i in rows])
    return items, 0


def plain_segment(role: Any, arguments: dict, items: int) -> tuple[int, int]:
    """SAM 2 as its model card runs it, one image and its boxes at a time (the processor takes one
    box-list length per batch)."""
    for image, boxes in list(zip(arguments["images"], arguments["boxes"]))[:items]:
        if not len(boxes):
            continue
        width, height = image.size
        pixels = (np.clip(np.asarray(boxes, np.float32), 0, 1) * [width, height, width, height]).tolist()
        inputs = role.processor(images=[image.convert("RGB")], input_boxes=[pixels], return_tensors="pt")
        outputs = role.model(pixel_values=inputs["pixel_values"].to(role.device, role.dtype),
                             input_boxes=inputs["input_boxes"].to(role.device, role.dtype), multimask_output=False)
        role.processor.post_process_masks(outputs.pred_masks.float().cpu(), inputs["original_sizes"], binarize=True)
    return items, 0


@functools.cache
def image_processor(path: str) -> Any:
    """The checkpoint's own image processor (read once, before the plain loop's clock starts)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path)


def plain_embed(role: Any, arguments: dict, items: int, texts: bool) -> tuple[int, int]:
    """CLIP / DINO through the checkpoint's own image processor (or tokenizer) and the model's features."""
    values = arguments["texts" if texts else "images"]
    processor = None if texts else image_processor(role.path)
    for start in range(0, items, role.batch_size):
        chunk = values[start:start + role.batch_size]
        if texts:
            tokens = role.tokenizer(chunk, padding=True, truncation=True, max_length=role.context_length,
                                    return_tensors="pt").to(role.device)
            role.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            continue
        pixels = processor(images=[im.convert("RGB") for im in chunk], return_tensors="pt")["pixel_values"].to(role.device, role.dtype)
        if role.spec.role == "dino":
            role.model(pixel_values=pixels).last_hidden_state[:, 0]
        else:
            role.model.get_image_features(pixel_values=pixels)
    return items, 0


# (role class, method) -> the plain loop; a backend not listed here gets no comparison.
PLAIN = {
    ("TransformersLLM", "generate"): plain_generate,
    ("TransformersVLM", "generate"): plain_generate,
    ("TransformersVLM", "yes_probability"): plain_forward,
    ("DiffusersT2I", "generate"): plain_t2i,
    ("DiffusersEditor", "edit"): plain_edit,
    ("TransformersDetector", "detect"): plain_detect,
    ("TransformersSegmenter", "segment"): plain_segment,
    ("TransformersClip", "embed_images"): lambda role, arguments, items: plain_embed(role, arguments, items, texts=False),
    ("TransformersClip", "embed_texts"): lambda role, arguments, items: plain_embed(role, arguments, items, texts=True),
    ("TransformersDino", "embed_images"): lambda role, arguments, items: plain_embed(role, arguments, items, texts=False),
}


def role_tokens(call: Call) -> int:
    tokenizer = call.role.processor.tokenizer if call.role.spec.role == "vlm" else call.role.tokenizer
    return sum(len(tokenizer(r.text, add_special_tokens=False).input_ids) + 1 for r in call.result)


def compare(call: Call, plain_batches: int) -> dict[str, Any]:
    """Our call's throughput against the plain loop's on its first batches of the same inputs."""
    first = next(iter(call.arguments.values()))
    count = len(first)
    row: dict[str, Any] = {"role": call.role.spec.role, "method": call.method, "items": count, "seconds": round(call.seconds, 4)}
    generation = call.method == "generate" and call.role.spec.role in ("llm", "vlm")
    if generation:
        row["tokens"] = role_tokens(call)
    plain = PLAIN.get((type(call.role).__name__, call.method))
    if plain is None or not count:
        return row
    items = min(count, call.role.batch_size * plain_batches)
    if call.role.spec.role in ("clip", "dino"):
        image_processor(call.role.path)
    synchronize(call.role.device)
    start = time.perf_counter()
    with torch.inference_mode():
        done, tokens = plain(call.role, {**call.arguments, "_result": call.result}, items)
    synchronize(call.role.device)
    seconds = time.perf_counter() - start
    row |= {"plain_items": done, "plain_seconds": round(seconds, 4)}
    if generation:
        row["plain_tokens"] = tokens
        ours, theirs = row["tokens"] / call.seconds, tokens / seconds
    else:
        ours, theirs = count / call.seconds, done / seconds
    row["ratio"] = round(ours / theirs, 3) if theirs else None
    return row


# --- a stage's measurements ---

def subjects_of(row: dict, stage: str) -> int:
    """A row's subjects as the stage received it (detect: the sampled categories)."""
    return len(row["categories"]) if stage == "detect" else int(row.get("num_subjects") or 0)


def stage_record(stage: str, summary: dict, rows_in: list[dict], rows_out: list[dict], peak: int | None,
                 calls: list[dict], min_subjects: int) -> dict[str, Any]:
    from tasks.stages import stage_named

    unit, plan = stage_named(stage).unit, stage_named(stage).plan
    if unit == "subjects":
        units = sum(subjects_of(r, stage) for r in rows_in)
    else:
        units = len({r["source_id"] for r in rows_in}) if unit == "sources" else len(rows_in)
    subjects: dict[str, Any] = {}
    if plan == "subjects":  # a subject's survival, measured on the rows the stage kept
        before = {r["id"]: subjects_of(r, stage) for r in rows_in}
        sampled = sum(before[r["id"]] for r in rows_out)
        subjects = {"subject_keep": sum(r["num_subjects"] for r in rows_out) / sampled if sampled else None,
                    "subject_counts_in": dict(Counter(before.values())), "min_subjects": min_subjects}
    compute = max(summary["seconds"] - summary.get("load_seconds", 0.0), 1e-9)
    return {"stage": stage, "unit": unit, "units": units, "rows_in": summary["rows_in"], "rows_out": summary["rows_out"],
            "dropped": summary["dropped"], **subjects, "seconds": summary["seconds"],
            "model_seconds": summary["model_seconds"], "load_seconds": summary.get("load_seconds", 0.0),
            "items_per_s": units / compute, "peak_bytes": peak, "calls": calls}


def diffusion_figures(calls: list[Call], peak_tflops: float | None) -> list[dict[str, Any]]:
    """Seconds per image of each FLUX call and its fraction of the dense bf16 peak."""
    rows = []
    for call in calls:
        if call.method not in ("generate", "edit") or call.role.spec.role not in ("t2i", "editor") or not call.result:
            continue
        pipeline, options = call.role.pipeline, call.role.call_options
        steps, text_tokens = options["num_inference_steps"], options.get("max_sequence_length", 512)
        flops = 0.0
        for image in call.result:
            tokens = (image.width // 16) * (image.height // 16)
            if call.role.spec.role == "editor":
                tokens *= 2  # Kontext attends over the conditioning image's tokens too
            flops += steps * flux_forward_flops(pipeline.transformer.config, tokens, text_tokens)
        seconds = call.seconds / len(call.result)
        sizes = sorted({image.size for image in call.result})
        rows.append({"stage": call.stage, "role": call.role.spec.role, "sizes": [f"{w}x{h}" for w, h in sizes], "steps": steps,
                     "seconds_per_image": seconds, "tflop_per_image": flops / len(call.result) / 1e12,
                     "fraction_of_peak": (flops / call.seconds / 1e12 / peak_tflops) if peak_tflops else None})
    return rows


# --- the run ---

def run(args: argparse.Namespace) -> dict[str, Any]:
    from music_model.roles import release_roles
    from tasks.build_tasks import enter_stage, run_stage_shard
    from tasks.checks.cost_plan import funnel, measured_rates, project_hours
    from tasks.engine.contract import read_rows
    from tasks.engine.markers import shard_name
    from tasks.publishing.publish import publish
    from tasks.stages import stage_chain

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak_tflops = dense_bf16_tflops(device_name) if cuda else None
    output_root = Path(args.keep or tempfile.mkdtemp(prefix="music-gpu-pipeline-"))
    spec = bench_spec(args.tiny, args.sources, args.subjects, args.device, output_root)
    spec_json = spec.model_dump_json()
    started = time.perf_counter()
    chain = stage_chain(spec)
    records, summaries, diffusion = [], [], []
    print(f"{'stage':10s} {'units':>13s} {'items/s':>11s}  model calls  load  peak accelerator memory  kept/in  [elapsed]\n"
          "    role.method  items  seconds (tok/s) | the plain loop on the same inputs; ratio = ours / plain throughput", flush=True)
    try:
        for link in chain:
            stage, fp, upstream_dir, out_dir = link.stage, link.fingerprint, link.upstream_dir, link.folder
            calls: list[Call] = []
            # Free the previous stage's models before the peak is reset, so it is this stage's alone
            # (run_stage_shard does the same; here it must come first).
            enter_stage(spec, stage.name)
            if cuda:
                synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            with recording(calls):
                summary = run_stage_shard(stage.name, spec_json, 0, fp, str(upstream_dir) if upstream_dir else None)
            peak = torch.cuda.max_memory_allocated(device) if cuda else None
            rows_in = read_rows(upstream_dir / f"{shard_name(0)}.parquet") if upstream_dir else [
                {"index": i} for i in range(spec.num_source_images)]
            rows_out = read_rows(out_dir / f"{shard_name(0)}.parquet")
            compared = [compare(call, args.plain_batches) for call in calls]
            diffusion += diffusion_figures(calls, peak_tflops)
            calls.clear()  # the recorded inputs and outputs (images) are not kept past their stage
            record = stage_record(stage.name, summary, rows_in, rows_out, peak, compared, spec.verify.min_subjects)
            records.append(record)
            summaries.append(summary)
            print_stage(record, time.perf_counter() - started)
        release_roles()
        stats = publish(spec, chain[-1].folder, 1, summaries, chain[-1].fingerprint)
        publish_row = stats["funnel"][-1]
    finally:
        if not args.keep:
            shutil.rmtree(output_root, ignore_errors=True)
    bench = {"device": device_name, "dtype": "float32" if not cuda else "bfloat16", "tiny": args.tiny,
             "sources": args.sources, "subjects": args.subjects, "torch": torch.__version__,
             "peak_dense_bf16_tflops": peak_tflops, "stages": records,
             "publish": {"rows_in": publish_row["rows_in"], "rows_out": publish_row["rows_out"],
                         "near_duplicate": publish_row["dropped"].get("near_duplicate", 0)},
             "diffusion": diffusion, "wall_seconds": time.perf_counter() - started}
    # 4. The projection: music_10k's funnel at the measured keep rates and seconds per unit.
    target = load_build_spec("music_10k.yaml")
    measured = {**bench, "stages": {r["stage"]: r for r in records}}
    expected = funnel(target, measured_rates(measured))
    hours = project_hours(expected, measured)
    bench["projection"] = {"spec": "music_10k.yaml", "samples": expected["samples"], "published": expected["published"],
                           "stages": hours, "gpu_hours": sum(row["hours"] for row in hours)}
    return bench


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def print_stage(record: dict[str, Any], elapsed: float) -> None:
    print(f"{record['stage']:10s} {record['units']:4d} {record['unit']:8s} {record['items_per_s']:9.3f}/s  "
          f"model {record['model_seconds']:8.2f} s  load {record['load_seconds']:7.2f} s  peak {_gib(record['peak_bytes']):>6s} GiB  "
          f"kept {record['rows_out']}/{record['rows_in']}  [{elapsed:6.1f} s]", flush=True)
    for call in record["calls"]:
        line = f"    {call['role']}.{call['method']:13s} {call['items']:4d} items {call['seconds']:8.2f} s"
        if "tokens" in call:
            line += f" {call['tokens'] / call['seconds']:8.1f} tok/s"
        if "plain_seconds" in call:
            plain = (f"{call['plain_tokens'] / call['plain_seconds']:8.1f} tok/s" if "plain_tokens" in call
                     else f"{call['plain_items'] / call['plain_seconds']:8.3f} items/s")
            ratio = "-" if call["ratio"] is None else f"{call['ratio']:.2f}"
            line += f" | plain {call['plain_items']} items {call['plain_seconds']:.2f} s {plain}  ratio {ratio}"
        print(line, flush=True)


def print_summary(bench: dict[str, Any]) -> None:
    peaks = [r["peak_bytes"] for r in bench["stages"] if r["peak_bytes"] is not None]
    print(f"\ndevice {bench['device']} ({bench['dtype']}), {bench['sources']} sources of {bench['subjects']} subjects, "
          f"{bench['wall_seconds']:.1f} s wall; largest stage peak {_gib(max(peaks)) if peaks else '-'} GiB")
    for row in bench["diffusion"]:
        fraction = "-" if row["fraction_of_peak"] is None else f"{100 * row['fraction_of_peak']:.1f}%"
        print(f"{row['stage']:10s} {row['role']:6s} {','.join(row['sizes'])} x {row['steps']} steps: {row['seconds_per_image']:.2f} s/image, "
              f"{row['tflop_per_image']:.1f} TFLOP/image, {fraction} of the dense bf16 peak "
              f"({bench['peak_dense_bf16_tflops'] or '-'} TFLOPS)")
    projection = bench["projection"]
    label = " (tiny models on the CPU: exercises the code, not a real projection)" if bench["tiny"] else ""
    print(f"music_10k on {bench['device']}: {projection['published']:.0f} published samples expected, "
          f"{projection['gpu_hours']:.1f} GPU-hours{label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny variants of tiny.yaml on the CPU (the test suite runs this)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    # At 1024 px and 28 steps a target is ~2 PFLOP and a re-rendered subject ~5: 3 sources of 2
    # subjects, each diffusion call replayed once by the plain loop, fit the 8-minute budget.
    parser.add_argument("--sources", type=int, default=None, help="source images of the build, one shard (default 3; --tiny 2)")
    parser.add_argument("--subjects", type=int, default=None, help="subjects sampled per source (default 2; --tiny 3: decimation runs)")
    parser.add_argument("--plain-batches", type=int, default=1, help="batches of each model call the plain loop replays")
    parser.add_argument("--keep", default=None, help="build into this folder and keep it (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write the result JSON here (what `music plan --bench` reads)")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.sources = args.sources or (2 if args.tiny else 3)
    args.subjects = args.subjects or (3 if args.tiny else 2)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --tiny for the CPU run")
    checks = device_check()
    print_device_check(checks)
    bench = run(args)
    bench["device_check"] = checks
    print_summary(bench)
    if args.out:
        Path(args.out).write_text(json.dumps(bench, indent=1) + "\n")
    if not all(row["ok"] for row in checks):
        raise SystemExit("device check failed: a shard thread's current CUDA device is not its slot's")


if __name__ == "__main__":
    main()
