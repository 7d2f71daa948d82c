"""Plan a build before spending GPU-hours: shards and task runs, the samples the spec's funnel can
yield, the models and memory each stage needs and, from a `benchmarks/gpu_pipeline.py` result, the
projected GPU-hours. Nothing here loads a model or imports Prefect.

Model sizes: a hub ID with an `arch` entry (`music_model.zoo.arch`) or an `arch:` model is counted
on the `meta` device (no memory), a zoo or local folder from its safetensors headers (or a
memory-mapped `.pth`); the bytes are at the role's dtype (`auto`: bfloat16, as on a GPU). A stage's
peak is the sum of its roles' weights (activations come on top: the benchmark measures them).

The funnel: sampled subject counts follow `subject_counts`; a source with n subjects after
detect / verify / rerender yields the decimated samples n, n-1, ..., `decimate.min_subjects`
within the filter's bounds, and publish caps at `max_samples`. Without measurements nothing drops
(an upper bound). With a benchmark result, rows drop at the measured keep rate of each stage and
each subject survives detect, verify and rerender independently at that stage's measured rate
(binomial thinning), a source falling out when fewer than `verify.min_subjects` remain.

The benchmark result (JSON) this reads: `{"device": str, "stages": [{"stage", "unit", "units",
"rows_in", "rows_out", "seconds", "load_seconds"; subject stages also "subject_keep",
"subject_counts_in", "min_subjects"}, ...], "publish": {"rows_in", "near_duplicate"}}`, one
record per stage from compose to filter.
"""
from __future__ import annotations

import json
import math
import re
import struct
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from data_specs.build import BuildSpec
from data_specs.roles import RoleSpec, model_kind
from music_model.paths import zoo_dir
from music_model.zoo.arch import ARCH_BY_HUB_ID, param_bytes, param_count
from tasks.engine.contract import Stage, num_shards
from tasks.publishing import waves
from tasks.stages import STAGES, stage_named

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_VARIANT = re.compile(r"\.(fp16|bf16|fp32)\.safetensors$")


class PlanError(ValueError):
    """A benchmark result that cannot be read; the message names the file and the problem."""


# --- models and memory ---

@dataclass(frozen=True)
class ModelSize:
    role: str
    model: str
    dtype: str
    parameters: int | None
    bytes: int | None
    source: str  # how the size was found, or why it is unknown


def planned_dtype(spec: RoleSpec) -> torch.dtype:
    """The dtype the role will run in on the machine the plan is for: `auto` is bfloat16 unless the
    role is pinned to the CPU (`roles.base.resolve_dtype` on a GPU machine)."""
    if spec.dtype == "auto":
        return torch.float32 if spec.device == "cpu" else torch.bfloat16
    return _DTYPES[spec.dtype]


def _safetensors_parameters(path: Path) -> int:
    """Parameters in a safetensors file, from its header (8-byte length, then JSON): no tensor is read."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")


def folder_parameters(path: Path) -> int | None:
    """Parameters stored under `path` (a folder or one file): safetensors headers, else
    memory-mapped PyTorch checkpoints (tensor data is never read); None when it holds no weights."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    tensors = [p for p in files if p.suffix == ".safetensors"]
    # A folder holding a checkpoint in two precisions (`model.fp16.safetensors`) counts one of them.
    plain = {p.parent for p in tensors if not _VARIANT.search(p.name)}
    tensors = [p for p in tensors if not (_VARIANT.search(p.name) and p.parent in plain)]
    if tensors:
        return sum(_safetensors_parameters(p) for p in tensors)
    pickled = [p for p in files if p.suffix in (".pth", ".pt", ".bin")]
    if not pickled:
        return None
    total = 0
    for checkpoint in pickled:
        state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)
        total += sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    return total


def model_size(spec: RoleSpec) -> ModelSize:
    """The parameters and weight bytes of a role's model, without loading it."""
    dtype = planned_dtype(spec)
    row = dict(role=spec.role, model=spec.model, dtype=str(dtype).removeprefix("torch."))
    kind = model_kind(spec.model)
    arch = spec.model.removeprefix("arch:") if kind == "arch" else ARCH_BY_HUB_ID.get(spec.model) if kind == "hub" else None
    if arch:
        how = "arch on meta" if kind == "arch" else f"published config (arch:{arch}) on meta"
        return ModelSize(**row, parameters=param_count(arch), bytes=param_bytes(arch, dtype), source=how)
    if kind == "hub":
        return ModelSize(**row, parameters=None, bytes=None, source="hub model with no arch entry: size unknown")
    path = zoo_dir() / spec.model.removeprefix("zoo:") if kind == "zoo" else Path(spec.model).expanduser()
    if kind == "zoo" and not (path / "zoo_entry.json").exists():
        return ModelSize(**row, parameters=None, bytes=None, source="zoo entry not built (music zoo build): size unknown")
    count = folder_parameters(path)
    if count is None:
        return ModelSize(**row, parameters=None, bytes=None, source=f"no weight files under {path}")
    return ModelSize(**row, parameters=count, bytes=count * dtype.itemsize, source="weight file headers")


def stage_models(spec: BuildSpec) -> list[dict[str, Any]]:
    """Per stage: its roles' sizes and its peak, the sum of its roles' weights (None if one is unknown)."""
    sizes = {name: model_size(role) for name, role in spec.roles.items()}
    rows = []
    for stage in STAGES:
        models = [sizes[name] for name in stage.roles]
        known = all(m.bytes is not None for m in models)
        rows.append({"stage": stage.name, "models": [asdict(m) for m in models],
                     "peak_bytes": sum(m.bytes for m in models) if known else None})
    return rows


# --- the funnel ---

@dataclass(frozen=True)
class Rates:
    """Measured keep rates: `row_keep[stage]` = rows out / rows in for drops that do not depend on
    the subject count; `subject_keep[stage]` = a subject's survival of detect / verify / rerender;
    `near_duplicate_keep` = rows publish keeps from near-duplicate removal."""

    row_keep: dict[str, float]
    subject_keep: dict[str, float]
    near_duplicate_keep: float = 1.0


NO_DROPS = Rates({}, {})


def decimation_counts(n: int, spec: BuildSpec) -> list[int]:
    """Subject counts of the samples decimate makes from one with n subjects (`music_model.subjects.decimate`)."""
    low = spec.decimate.min_subjects
    return [n] if n <= low else list(range(n, low - 1, -1))


def _thin(dist: dict[int, float], keep: float) -> dict[int, float]:
    """Row counts by subject count after each subject survives with probability `keep`."""
    out: dict[int, float] = defaultdict(float)
    for n, rows in dist.items():
        for k in range(n + 1):
            out[k] += rows * math.comb(n, k) * keep**k * (1 - keep) ** (n - k)
    return out


def funnel(spec: BuildSpec, rates: Rates = NO_DROPS) -> dict[str, Any]:
    """Expected rows, subjects and work units entering each stage, samples and published samples."""
    total = sum(spec.subject_counts.values())
    dist = {n: spec.num_source_images * w / total for n, w in spec.subject_counts.items()}
    stages = []

    def record(stage: Stage, dist_in: dict[int, float], rows_out: float, sources: float | None) -> None:
        # A stage's work (`Stage.unit`): a row (one caption, image, detection or annotation), a subject
        # (one verification, re-render or mask) or a distinct source image (filter's CLIP embedding).
        rows_in, subjects_in = sum(dist_in.values()), sum(n * r for n, r in dist_in.items())
        units = {"rows": rows_in, "subjects": subjects_in, "sources": rows_in if sources is None else sources}[stage.unit]
        stages.append({"stage": stage.name, "unit": stage.unit, "units": units, "rows_in": rows_in, "subjects_in": subjects_in,
                       "rows_out": rows_out})

    sources = None  # rows are sources until a stage decimates them
    for stage in STAGES:  # each as its `Stage.plan` says
        entering = dist
        if stage.plan == "subjects":  # a source left under verify.min_subjects drops
            dist = {n: r for n, r in _thin(dist, rates.subject_keep.get(stage.name, 1.0)).items() if n >= spec.verify.min_subjects}
        elif stage.plan == "decimate":
            sources, decimated = sum(dist.values()), defaultdict(float)
            for n, rows in dist.items():
                for k in decimation_counts(n, spec):
                    decimated[k] += rows
            dist = dict(decimated)
        elif stage.plan == "select":
            dist = {k: r for k, r in dist.items() if spec.filter.min_subjects <= k <= spec.filter.max_subjects}
        dist = {n: r * rates.row_keep.get(stage.name, 1.0) for n, r in dist.items()}
        record(stage, entering, sum(dist.values()), sources)
    kept = sum(dist.values())
    samples = kept * rates.near_duplicate_keep
    cap = spec.target.samples if spec.target else spec.publish.max_samples  # a target publishes exactly its samples
    published = min(samples, cap) if cap is not None else samples
    per_source = samples / spec.num_source_images
    by_count = {k: r * rates.near_duplicate_keep / spec.num_source_images for k, r in sorted(dist.items())}
    return {"stages": stages, "samples": samples, "published": published, "max_samples": cap, "per_source": per_source,
            "per_source_by_count": by_count, "sources_for_cap": math.ceil(cap / per_source) if cap and per_source else None}


def target_projection(spec: BuildSpec, upper: dict[str, Any], expected: dict[str, Any] | None) -> dict[str, Any]:
    """For a build to a target: the first wave (from the no-drop prior, as the build sizes it) and,
    with measured keep rates, the sources the target needs and so the waves after the first."""
    first = waves.first_wave(spec, upper["per_source_by_count"])
    result: dict[str, Any] = {"samples": spec.target.samples, "wanted": waves.wanted(spec), "first_wave": first,
                              "ceiling": spec.num_source_images, "sources": None, "waves": None}
    if expected is not None:
        per_source = waves.by_key(spec, expected["per_source_by_count"])
        # a subject count the rates never yield: more than the ceiling, however many sources
        needed = max(math.ceil(need / per_source[key]) if per_source[key] else spec.num_source_images + 1
                     for key, need in result["wanted"].items())
        result["sources"] = needed
        result["reachable"] = needed <= spec.num_source_images
        result["waves"] = 1 if needed <= first else 2  # the second wave is sized from the first one's yields
    return result


# --- disk ---

# Bytes a pixel of a lossless PNG of a photograph (an assumption; about 1.5-2.5 for FLUX-like photos,
# 3 for the tiny zoo's noise): what the image store and the published set hold per image.
PNG_BYTES_PER_PIXEL = 2.0
ROW_BYTES = 2048  # a stage row without images in zstd Parquet: texts, boxes, RLE masks, layout, image paths
EMBEDDING_BYTES = 4 * 768  # filter's CLIP embedding per row (ViT-L/14: 768 float32)


def disk(spec: BuildSpec, expected: dict[str, Any]) -> dict[str, Any]:
    """Bytes each stage leaves in the build folder (its rows, the images it stores once) and the
    bytes of the published set (every sample embeds its target and references), for `expected`."""
    target = spec.synthesize.width * spec.synthesize.height * PNG_BYTES_PER_PIXEL
    reference = spec.rerender.size**2 * PNG_BYTES_PER_PIXEL  # the longer side squared: a square crop's, an upper bound
    stages = expected["stages"]
    subjects_out = {s["stage"]: (stages[i + 1]["subjects_in"] if i + 1 < len(stages) else s["subjects_in"]) for i, s in enumerate(stages)}
    rows = []
    for s in stages:
        images = {"synthesize": s["rows_out"] * target, "rerender": subjects_out[s["stage"]] * reference}.get(s["stage"], 0.0)
        table = s["rows_out"] * (ROW_BYTES + (EMBEDDING_BYTES if s["stage"] == "filter" else 0))
        rows.append({"stage": s["stage"], "images_bytes": images, "rows_bytes": table})
    last = stages[-1]
    per_sample_subjects = last["subjects_in"] / last["rows_in"] if last["rows_in"] else 0.0
    published = expected["published"] * (target + per_sample_subjects * reference + ROW_BYTES)
    intermediate = sum(r["images_bytes"] + r["rows_bytes"] for r in rows)
    return {"stages": rows, "intermediate_bytes": intermediate, "published_bytes": published,
            "ratio": intermediate / published if published else None, "png_bytes_per_pixel": PNG_BYTES_PER_PIXEL}


# --- a benchmark result ---

def read_bench(path: str | Path) -> dict[str, Any]:
    """A `benchmarks/gpu_pipeline.py` result, checked for what the plan reads."""
    path = Path(path)
    try:
        bench = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"{path}: benchmark result not found") from None
    except json.JSONDecodeError as error:
        raise PlanError(f"{path}: not JSON: {error}") from None
    stages = {s.get("stage"): s for s in bench.get("stages", []) if isinstance(s, dict)}
    for stage in STAGES:
        if stage.name not in stages:
            raise PlanError(f"{path}: no record of stage {stage.name!r} (a gpu_pipeline.py result has every stage)")
        record = stages[stage.name]
        missing = [k for k in ("unit", "units", "rows_in", "rows_out", "seconds", "load_seconds") if k not in record]
        if missing:
            raise PlanError(f"{path}: stage {stage.name!r} lacks {', '.join(missing)}")
        if record["unit"] != stage.unit:
            raise PlanError(f"{path}: stage {stage.name!r} counts {record['unit']}, the plan counts {stage.unit}")
    return {**bench, "stages": stages}


def _survival(counts: dict[int, float], keep: float, minimum: int) -> float:
    """The fraction of rows (by subject count) left with at least `minimum` subjects when each
    subject survives with probability `keep`."""
    kept = sum(rows * sum(math.comb(n, k) * keep**k * (1 - keep) ** (n - k) for k in range(minimum, n + 1))
               for n, rows in counts.items())
    return kept / sum(counts.values())


def measured_rates(bench: dict[str, Any]) -> Rates:
    """Keep rates from a benchmark result (`read_bench`); a stage that saw no rows keeps everything.

    A subject stage's survival is measured on the rows it kept, which overstates it (a dropped
    row's survivors are not counted): when the record has its input's subject counts, the rows the
    thinning model predicts to keep are scaled to the rows the stage really kept."""
    stages = bench["stages"]
    row_keep, subject_keep = {}, {}
    for stage in STAGES:
        record = stages[stage.name]
        if not record["rows_in"] or stage.plan not in ("rows", "subjects"):  # decimate and select follow from the counts
            continue
        measured = record["rows_out"] / record["rows_in"]
        if stage.plan == "rows":
            row_keep[stage.name] = measured
            continue
        subject_keep[stage.name] = record.get("subject_keep") or 1.0
        counts = {int(n): rows for n, rows in (record.get("subject_counts_in") or {}).items()}
        predicted = _survival(counts, subject_keep[stage.name], record.get("min_subjects", 1)) if counts else 0.0
        if predicted:
            row_keep[stage.name] = min(1.0, measured / predicted)
    publish = bench.get("publish") or {}
    near = publish.get("near_duplicate", 0) / publish["rows_in"] if publish.get("rows_in") else 0.0
    return Rates(row_keep, subject_keep, 1.0 - near)


def project_hours(expected: dict[str, Any], bench: dict[str, Any]) -> list[dict[str, Any]]:
    """GPU-hours per model stage: the expected units at the measured seconds per unit (model loads
    excluded), plus one load of the stage's models."""
    rows = []
    for stage in expected["stages"]:
        if not stage_named(stage["stage"]).roles:
            continue  # CPU only (decimate)
        record = bench["stages"][stage["stage"]]
        compute = max(0.0, record["seconds"] - record["load_seconds"])
        per_unit = compute / record["units"] if record["units"] else None
        seconds = (stage["units"] * per_unit if per_unit is not None else 0.0) + record["load_seconds"]
        rows.append({"stage": stage["stage"], "unit": stage["unit"], "units": stage["units"],
                     "seconds_per_unit": per_unit, "load_seconds": record["load_seconds"], "hours": seconds / 3600})
    return rows


def wave_cost(hours: list[dict[str, Any]], spec: BuildSpec) -> dict[str, float | None]:
    """What one more wave of a build to a target costs (`target.wave_cost`): every model stage's
    load seconds, and that in sources' worth of GPU work (the projected seconds per source made)."""
    loads = sum(row["load_seconds"] for row in hours)
    per_source = sum(row["units"] * row["seconds_per_unit"] for row in hours if row["seconds_per_unit"]) / spec.num_source_images
    return {"load_seconds": loads, "seconds_per_source": per_source, "sources": loads / per_source if per_source else None}


# --- the plan ---

def plan(spec: BuildSpec, bench: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything `music plan` prints, as data. `bench`: a result read with `read_bench`."""
    shards = num_shards(spec)
    result: dict[str, Any] = {
        "name": spec.name, "sources": spec.num_source_images, "shard_size": spec.shard_size, "shards": shards,
        "task_runs": len(STAGES) * shards + 1,  # every stage x shard, then publish
        "models": stage_models(spec), "upper_bound": funnel(spec),
    }
    result["disk"] = disk(spec, result["upper_bound"])
    expected = None
    if bench is not None:
        expected = funnel(spec, measured_rates(bench))
        hours = project_hours(expected, bench)
        result |= {"device": bench.get("device", "?"), "expected": expected, "hours": hours,
                   "gpu_hours": sum(row["hours"] for row in hours), "disk": disk(spec, expected), "wave_cost": wave_cost(hours, spec)}
    if spec.target is not None:
        result["target"] = target_projection(spec, result["upper_bound"], expected)
    return result


def _gib(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def _params(value: int | None) -> str:
    if value is None:
        return "?"
    return f"{value / 1e9:.2f} B" if value >= 1e8 else f"{value / 1e6:.2f} M"


def format_plan(result: dict[str, Any]) -> str:
    """The plan as the terminal shows it."""
    upper = result["upper_bound"]
    lines = [f"plan: {result['name']}",
             f"  sources {result['sources']} in {result['shards']} shards of {result['shard_size']}; "
             f"task runs {result['task_runs']} ({len(STAGES)} stages x {result['shards']} shards + publish)", "",
             "models and weight memory by stage (dtype auto = bfloat16 on a GPU; activations come on top):"]
    for row in result["models"]:
        if not row["models"]:
            lines.append(f"  {row['stage']:10s} CPU only")
            continue
        lines.append(f"  {row['stage']:10s} peak {_gib(row['peak_bytes'])}")
        for m in row["models"]:
            lines.append(f"    {m['role']:9s} {m['model']:40s} {m['dtype']:8s} {_params(m['parameters']):>9s} "
                         f"{_gib(m['bytes']):>10s}  ({m['source']})")
    peaks = [row["peak_bytes"] for row in result["models"] if row["models"]]
    if all(p is not None for p in peaks):
        lines.append(f"  largest stage: {_gib(max(peaks))} of weights resident at once")
    lines += ["", "funnel (upper bound: nothing dropped):"]
    lines += _funnel_lines(upper)
    if "expected" in result:
        lines += ["", f"funnel with the keep rates measured on {result['device']}:"]
        lines += _funnel_lines(result["expected"])
        lines += ["", f"projected GPU-hours on {result['device']} (measured seconds per unit; one model load per stage):"]
        for row in result["hours"]:
            rate = "-" if row["seconds_per_unit"] is None else f"{row['seconds_per_unit']:.3f} s/{row['unit'].rstrip('s')}"
            lines.append(f"  {row['stage']:10s} {row['units']:10.0f} {row['unit']:9s} {rate:>16s}  load {row['load_seconds']:6.1f} s"
                         f"  {row['hours']:8.2f} h")
        lines.append(f"  total {result['gpu_hours']:.1f} GPU-hours")
        cost = result["wave_cost"]
        if cost["sources"] is not None:
            lines.append(f"  one wave's model loads: {cost['load_seconds']:.1f} s = {cost['sources']:.1f} sources' worth of GPU work "
                         f"at {cost['seconds_per_source']:.2f} s a source (target.wave_cost; a GPU per worker loads each model)")
    if "target" in result:
        lines += ["", *_target_lines(result["target"])]
    space = result["disk"]
    lines += ["", f"disk ({'measured keep rates' if 'expected' in result else 'upper bound'}; PNG at "
                  f"{space['png_bytes_per_pixel']} bytes a pixel, an assumption; each image stored once):"]
    for row in space["stages"]:
        lines.append(f"  {row['stage']:10s} images {_gib(row['images_bytes']):>10s}  rows {_gib(row['rows_bytes']):>10s}")
    ratio = f" ({space['ratio']:.2f}x the published)" if space["ratio"] else ""
    lines += [f"  build folder {_gib(space['intermediate_bytes'])}{ratio}; published set {_gib(space['published_bytes'])}; "
              f"free disk for both: {_gib(space['intermediate_bytes'] + space['published_bytes'])}"]
    return "\n".join(lines)


def _target_lines(target: dict[str, Any]) -> list[str]:
    wanted = ", ".join(f"{count} of {key} subjects" if key else "any subject count" for key, count in target["wanted"].items())
    lines = [f"target: {target['samples']} samples ({wanted}); num_source_images {target['ceiling']} is the ceiling, "
             "and the figures above are at the ceiling",
             f"  wave 1: {target['first_wave']} sources (the no-drop prior: never more than the target needs); "
             "each later wave is sized from the yields measured so far"]
    if target["sources"] is None:
        lines.append("  with --bench (measured keep rates) the plan projects the sources and waves the target needs")
    elif target["reachable"]:
        lines.append(f"  at the measured keep rates: about {target['sources']} sources in about {target['waves']} waves")
    else:
        lines.append(f"  at the measured keep rates the target needs about {target['sources']} sources: more than the ceiling "
                     f"({target['ceiling']}); raise num_source_images or lower the target")
    return lines


def _funnel_lines(expected: dict[str, Any]) -> list[str]:
    lines = [f"  {s['stage']:10s} in {s['rows_in']:10.0f} rows {s['subjects_in']:10.0f} subjects -> out {s['rows_out']:10.0f}"
             for s in expected["stages"]]
    cap = expected["max_samples"]
    capped = f", capped at {cap}" if cap is not None and expected["samples"] > cap else ""
    lines.append(f"  samples {expected['samples']:.0f} ({expected['per_source']:.2f} per source){capped}: "
                 f"{expected['published']:.0f} published")
    if cap is not None and expected["samples"] < cap:
        lines.append(f"  below max_samples {cap}: about {expected['sources_for_cap']} sources would reach it")
    return lines
