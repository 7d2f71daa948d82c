"""Completion markers: the one proof of a finished shard of any kind (a build stage's, an
evaluation's, a generation's) and the one shard runner that writes them.

A shard's `.done.json` marker is written last, beside its outputs. The marker records each part's
bytes, rows and sha256 and the size of each image the shard stored: a shard is reused only when
they still prove themselves (sizes and Parquet footers; the hashes too with `verify`), and is
redone otherwise.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_specs.build import BuildSpec
from music_model.roles import thread_load_seconds, thread_model_loads, thread_oom_retries
from safe_files import sha256_file, write_atomic
from tasks.engine.build_paths import build_dir, stage_dir
from tasks.engine.image_store import image_problem

MARKER_SUFFIX = ".done.json"


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}"


def shard_marker(folder: Path, shard: int) -> Path:
    """The marker of shard `shard` among the outputs in `folder`: the one place its name is spelled."""
    return folder / f"{shard_name(shard)}{MARKER_SUFFIX}"


def part_record(path: Path) -> dict:
    """What a marker records of one part it vouches for."""
    return {"bytes": path.stat().st_size, "rows": pq.read_metadata(path).num_rows, "sha256": sha256_file(path)}


def part_problem(path: Path, record: dict, verify: bool) -> str | None:
    """Why the part at `path` is not what its marker recorded, or None when it is."""
    if not path.exists():
        return "is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"is {size} bytes, its marker says {record['bytes']}"
    try:
        rows = pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError) as error:
        return f"has an unreadable Parquet footer ({str(error).splitlines()[0]})"
    if rows != record["rows"]:
        return f"holds {rows} rows, its marker says {record['rows']}"
    if verify and sha256_file(path) != record["sha256"]:
        return "has another sha256 than its marker's"
    return None


def check_marker(marker: Path, verify: bool = False, images_root: Path | None = None, label: str | None = None,
                 made_from: str | None = None) -> tuple[dict | None, str | None]:
    """The one proof of a finished shard of any kind (a build stage's, an evaluation's, a
    generation's): (marker, None) when every output it records still proves itself (and, under
    `images_root`, every image it records) and, with `made_from`, it was made from that input;
    (None, why) when not, the marker and every output or image that failed removed, so the shard is
    redone and writes them anew; (None, None) for a shard still to do."""
    try:
        done = json.loads(marker.read_text())
    except FileNotFoundError:
        return None, None
    except json.JSONDecodeError:
        done = {}
    outputs = done.get("outputs")
    # path -> why: what failed its check is never trusted again, but removed so the redo writes it
    # anew (the image store keeps a name it holds, and a damaged image keeps its name).
    rejected = {marker.parent / name: f"{name} {problem}" for name, record in (outputs or {}).items()
                if (problem := part_problem(marker.parent / name, record, verify))}
    if images_root is not None:
        rejected |= {images_root / relative: problem for relative, size in done.get("images", {}).items()
                     if (problem := image_problem(images_root, relative, size, verify))}
    problems = ([] if outputs is not None else [f"{marker.name} is unreadable or records no outputs"]) + [*rejected.values()]
    if made_from is not None and done.get("input") != made_from:
        problems.append(f"its input changed ({done.get('input')} -> {made_from})")
    if problems:
        for path in [marker, *rejected]:
            path.unlink(missing_ok=True)
        return None, f"redoing {label or marker.name.removesuffix(MARKER_SUFFIX)} of {marker.parent}: {'; '.join(problems)}"
    return {**done, "skipped": True}, None


def finish_marker(marker: Path, summary: dict, outputs: list[Path]) -> dict:
    """Write a shard's marker, last: `summary` plus the bytes, rows and sha256 of each output (files
    beside the marker) that `check_marker` later holds them to."""
    summary = {**summary, "outputs": {path.name: part_record(path) for path in outputs}}
    write_atomic(marker, lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    return {**summary, "skipped": False}


class ShardMeter:
    """What one shard's work cost on this thread, from construction to `figures()`: wall seconds,
    model loads and their seconds, out-of-memory retries."""

    def __init__(self) -> None:
        self.start, self.loads = time.perf_counter(), thread_model_loads()
        self.load_seconds, self.oom_retries = thread_load_seconds(), thread_oom_retries()

    def figures(self) -> dict:
        return {"seconds": round(time.perf_counter() - self.start, 4), "model_loads": thread_model_loads() - self.loads,
                "load_seconds": round(thread_load_seconds() - self.load_seconds, 4),
                "oom_retries": thread_oom_retries() - self.oom_retries}


def run_marked(marker: Path, work: Callable[[], tuple[dict, list[Path]]], images_root: Path | None = None,
               made_from: str | None = None) -> dict:
    """The one shard runner, for every kind of shard: the marker when the shard is done and proves
    itself (made from `made_from`, when given); else `work()` (the summary and the output files it
    wrote beside the marker), measured by a `ShardMeter`, then the marker, recording the input."""
    if done := check_marker(marker, images_root=images_root, made_from=made_from)[0]:
        return done
    # Temporary files of a process killed mid-write: the shard is redone from scratch.
    for stale in marker.parent.glob(f".{marker.name.removesuffix(MARKER_SUFFIX)}.*.tmp"):
        stale.unlink(missing_ok=True)
    meter = ShardMeter()
    summary, outputs = work()
    made = {} if made_from is None else {"input": made_from}
    return finish_marker(marker, {**summary, **made, **meter.figures()}, outputs)


def scores_path(folder: Path, shard: int) -> Path:
    """A shard's scores table (`Stage(scores=...)`) in its stage folder."""
    return folder / f"{shard_name(shard)}.scores.parquet"


def marker_path(spec: BuildSpec, stage: str, fp: str, shard: int) -> Path:
    return shard_marker(stage_dir(spec, stage, fp), shard)


def check_shard(spec: BuildSpec, stage: str, fp: str, shard: int, verify: bool = False,
                expected_input: str | None = None) -> tuple[dict | None, str | None]:
    """`check_marker` for a build stage's shard, its images checked in the build's store; with
    `expected_input`, a marker made from another input (`shard_input`) is redone too."""
    return check_marker(marker_path(spec, stage, fp, shard), verify, build_dir(spec), f"{stage} shard {shard}", expected_input)
