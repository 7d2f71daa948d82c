"""A benchmark added the way the README says, for tests/test_benchmark_registry.py: this one module
plus one line in the registry (the test adds the line in a child process, so the project's registry
stays as shipped). It scores each image of a folder by its mean brightness, a model-free score, so
the test exercises the registry, the flow's shards, markers and fingerprints, and no model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from data_specs.eval import EvalSpec, Metric
from safe_files import write_atomic
from tasks.engine.contract import write_table
from tasks.engine.markers import run_marked, shard_marker, shard_name
from tasks.evaluate.benchmark import Benchmark, Prepared
from tasks.evaluate.common import chunks, files_digest, gather, markdown_table, write_json

BRIGHTNESS = Metric("brightness", "mean brightness")
SCORES = pa.schema([("path", pa.string()), BRIGHTNESS.column])


def prepare(spec: EvalSpec, inputs: dict, fill, logger) -> Prepared:
    folder = Path(inputs["images"] or "")
    images = sorted(str(p) for p in folder.glob("*.png"))
    if not images:
        raise ValueError(f"{folder}: no PNG images")
    return Prepared(files_digest([Path(p) for p in images]), [{"paths": group} for group in chunks(images, spec.shard_size)], len(images))


def score_shard(spec_json: str, shard: int, work_dir: str, paths: list[str]) -> dict:
    work = Path(work_dir)

    def scored() -> tuple[dict, list[Path]]:
        rows = [{"path": p, BRIGHTNESS.name: float(np.asarray(Image.open(p).convert("L"), dtype=np.float64).mean() / 255)} for p in paths]
        path = work / f"{shard_name(shard)}.scores.parquet"
        write_table(rows, SCORES, path)
        return {"shard": shard, "scored": len(rows)}, [path]

    return run_marked(shard_marker(work, shard), scored)


def finish(spec: EvalSpec, prepared: Prepared, work_dir: Path, extra: dict) -> dict:
    out = spec.out_dir()
    rows = gather(work_dir, len(prepared.shards), "scores", SCORES)
    write_table(rows, SCORES, out / "scores" / "images.parquet")
    mean = float(np.mean([r[BRIGHTNESS.name] for r in rows]))
    summary = {"benchmark": BENCHMARK.name, "name": spec.name, "images_in": prepared.state, "images_scored": len(rows),
               "scores": {BRIGHTNESS.name: mean}, "output": str(out), **extra}
    report = "\n".join([f"# Brightness: {spec.name}", "", f"{BRIGHTNESS.label}: {mean:.4f}", "", *markdown_table(rows)]) + "\n"
    write_atomic(out / "report.md", lambda tmp: tmp.write_text(report))
    write_json(out / "summary.json", summary)
    return {"summary": summary, "report": report, "tables": {"images": rows}}


BENCHMARK = Benchmark(name="brightness", metrics=(BRIGHTNESS,), prepare=prepare, score_shard=score_shard, finish=finish)
