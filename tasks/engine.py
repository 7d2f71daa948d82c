"""Shard I/O, fingerprints and completion markers: what makes every stage resumable.

A stage's output for shard k lives at `stages/<stage>/<fingerprint>/part-0000k.parquet`, with its
dropped rows beside it and a `.done.json` marker written last. A shard with a marker is done; one
without is redone from scratch. The fingerprint hashes the stage's name, version, parameters, role
specs and the upstream fingerprint, so changing one parameter reruns that stage and what follows.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from data_specs.build import STAGE_ROLES, BuildSpec, canonical_json
from data_specs.schemas import DROPPED, WORK
from music_model.roles import (load_role, peak_memory_bytes, reset_peak_memory, resident_roles, thread_load_seconds,
                               thread_model_loads, thread_oom_retries)
from music_model.roles.base import resolve_device
from music_model.roles.slots import current_device


def stable_int(*parts: Any) -> int:
    """A 63-bit integer from `parts`, the same on every machine and Python run."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_id(spec: BuildSpec, index: int) -> str:
    return f"{spec.name}-{index:06d}-{stable_int(spec.seed, index, 'id') % 16**6:06x}"


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_table(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}"


def num_shards(spec: BuildSpec) -> int:
    return -(-spec.num_source_images // spec.shard_size)


@dataclass
class Drop:
    row: dict
    reason: str
    detail: str = ""


@dataclass
class StageContext:
    spec: BuildSpec
    stage: str
    shard: int
    model_seconds: float = 0.0
    drops: list[Drop] = field(default_factory=list)

    def role(self, name: str):
        if name not in STAGE_ROLES[self.stage]:
            raise KeyError(f"stage {self.stage} does not declare role {name!r} (STAGE_ROLES)")
        return load_role(self.spec.roles[name])

    def seed(self, index: int, salt: str = "") -> int:
        """The seed of sample `index` in this stage: (spec seed, index, stage) hashed."""
        return stable_int(self.spec.seed, index, self.stage, salt) % (2**31)

    def drop(self, row: dict, reason: str, detail: str = "") -> None:
        self.drops.append(Drop(row, reason, detail[:500]))

    def timed(self, method: Callable, *args, **kwargs):
        """Call a role's method under that role's lock, counting the time as model compute."""
        with method.__self__.lock:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.model_seconds += time.perf_counter() - start


@dataclass(frozen=True)
class Stage:
    name: str
    version: int
    process: Callable[[list[dict], StageContext], list[dict]]

    def params(self, spec: BuildSpec) -> dict:
        section = getattr(spec, self.name, None)
        return section.model_dump() if section is not None else {}


def fingerprint(stage: Stage, spec: BuildSpec, upstream: str) -> str:
    roles = {name: spec.roles[name].model_dump() for name in STAGE_ROLES[stage.name]}
    payload = {"stage": stage.name, "version": stage.version, "params": stage.params(spec), "roles": roles, "upstream": upstream}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def root_fingerprint(spec: BuildSpec) -> str:
    """What every stage depends on: the sampling inputs of compose."""
    categories = hashlib.sha256(spec.categories_path().read_bytes()).hexdigest()
    payload = {"seed": spec.seed, "name": spec.name, "n": spec.num_source_images, "counts": spec.subject_counts,
               "categories": categories, "shard_size": spec.shard_size}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def build_dir(spec: BuildSpec) -> Path:
    return Path(spec.output_root).expanduser() / spec.name


def stage_dir(spec: BuildSpec, stage: str, fp: str) -> Path:
    return build_dir(spec) / "stages" / stage / fp


def done_marker(spec: BuildSpec, stage: str, fp: str, shard: int) -> dict | None:
    """The marker of a completed shard, or None when the shard is still to do."""
    marker = stage_dir(spec, stage, fp) / f"{shard_name(shard)}.done.json"
    return {**json.loads(marker.read_text()), "skipped": True} if marker.exists() else None


def run_shard(stage: Stage, spec: BuildSpec, shard: int, fp: str, upstream_dir: Path | None) -> dict:
    """Process one shard of one stage, or return its marker when it is already done."""
    if done := done_marker(spec, stage.name, fp, shard):
        return done
    out_dir = stage_dir(spec, stage.name, fp)
    marker = out_dir / f"{shard_name(shard)}.done.json"
    # Temporary files of a process killed mid-write: the shard is redone from scratch.
    for stale in out_dir.glob(f".{shard_name(shard)}.*.tmp"):
        stale.unlink(missing_ok=True)
    start, loads_before, load_seconds_before, oom_before = time.perf_counter(), thread_model_loads(), thread_load_seconds(), thread_oom_retries()
    device = current_device()
    reset_peak_memory(device)
    if upstream_dir is None:
        rows = [{"index": i} for i in range(shard * spec.shard_size, min((shard + 1) * spec.shard_size, spec.num_source_images))]
    else:
        rows = read_rows(upstream_dir / f"{shard_name(shard)}.parquet")
    context = StageContext(spec, stage.name, shard)
    kept = stage.process(rows, context)
    dropped = [
        {"id": d.row.get("id"), "index": d.row.get("index"), "stage": stage.name, "reason": d.reason, "detail": d.detail}
        for d in context.drops
    ]
    write_table(kept, WORK, out_dir / f"{shard_name(shard)}.parquet")
    write_table(dropped, DROPPED, out_dir / f"{shard_name(shard)}.dropped.parquet")
    summary = {
        "stage": stage.name,
        "shard": shard,
        "fingerprint": fp,
        "rows_in": len(rows),
        "rows_out": len(kept),
        "dropped": dict(sorted(Counter(d["reason"] for d in dropped).items())),
        "seconds": round(time.perf_counter() - start, 4),
        "model_seconds": round(context.model_seconds, 4),
        "model_loads": thread_model_loads() - loads_before,
        "load_seconds": round(thread_load_seconds() - load_seconds_before, 4),
        "oom_retries": thread_oom_retries() - oom_before,
        "device": device,
        "peak_device_bytes": peak_memory_bytes(device),
        # The models on this shard's device as it ends: the stage's own, nothing left from earlier stages.
        "resident": sorted({role for role, _, on in resident_roles() if on == str(resolve_device(device or "auto"))}),
    }
    write_atomic(marker, lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    return {**summary, "skipped": False}
