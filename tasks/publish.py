"""publish: drop near-duplicate sources across the build, then write the dataset in the Hugging
Face layout (`data/train-0000k-of-0000n.parquet`), its card, stats.json, report.md and plots.

The data files, card and stats depend only on the spec and the code version, so two builds of one
spec give the same bytes; timings go to report.md alone."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from data_specs.build import BuildSpec
from data_specs.schemas import PUBLISHED, PUBLISHED_FEATURES
from tasks.engine import build_dir, read_rows, shard_name, write_atomic

STAGE_ORDER = ["compose", "synthesize", "detect", "verify", "rerender", "annotate", "layout", "decimate", "filter"]


def code_version() -> str:
    version = metadata.version("music-pipeline")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


def near_duplicate_sources(rows: list[dict], threshold: float) -> dict[str, str]:
    """source_id -> the earlier kept source it nearly duplicates (CLIP cosine >= threshold)."""
    sources: dict[str, np.ndarray] = {}
    for row in sorted(rows, key=lambda r: r["source_id"]):
        sources.setdefault(row["source_id"], np.asarray(row["clip_embedding"], np.float32))
    kept_ids: list[str] = []
    kept_vectors: list[np.ndarray] = []
    duplicates = {}
    for source, vector in sources.items():
        if kept_vectors:
            scores = np.stack(kept_vectors) @ vector
            best = int(np.argmax(scores))
            if scores[best] >= threshold:
                duplicates[source] = kept_ids[best]
                continue
        kept_ids.append(source)
        kept_vectors.append(vector)
    return duplicates


def published_row(row: dict) -> dict:
    subjects = row["subjects"]
    return {
        "id": row["id"], "source_id": row["source_id"], "num_subjects": row["num_subjects"], "image": row["image"],
        "caption": row["caption"], "instruction": row["instruction"], "cot": row["cot"], "layout": row["layout"],
        "layout_text": row["layout_text"], "subject_ids": [s["id"] for s in subjects],
        "categories": [s["category"] for s in subjects], "boxes": [s["box"] for s in subjects],
        "masks": [s["mask"] for s in subjects], "regions": [s["region"] for s in subjects],
        "references": [s["reference"] for s in subjects],
    }


def _write_parquet(rows: list[dict], path: Path) -> None:
    schema = PUBLISHED.with_metadata({"huggingface": json.dumps({"info": {"features": PUBLISHED_FEATURES}})})
    table = pa.Table.from_pylist(rows, schema=schema)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def funnel(summaries: list[dict], publish_drops: Counter, published: int) -> list[dict]:
    by_stage: dict[str, dict] = {}
    for summary in summaries:
        entry = by_stage.setdefault(summary["stage"], {"stage": summary["stage"], "rows_in": 0, "rows_out": 0, "dropped": Counter()})
        entry["rows_in"] += summary["rows_in"]
        entry["rows_out"] += summary["rows_out"]
        entry["dropped"].update(summary["dropped"])
    rows = [by_stage[s] for s in STAGE_ORDER if s in by_stage]
    publish_in = by_stage["filter"]["rows_out"] if "filter" in by_stage else 0
    rows.append({"stage": "publish", "rows_in": publish_in, "rows_out": published, "dropped": publish_drops})
    return [{**r, "dropped": dict(sorted(r["dropped"].items()))} for r in rows]


def _plots(folder: Path, stages: list[dict], counts: Counter) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(8, 3.5))
    axis.bar([s["stage"] for s in stages], [s["rows_out"] for s in stages], color="#4c72b0")
    axis.set_ylabel("rows kept")
    axis.set_title("Funnel")
    axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(folder / "funnel.png", metadata={"Software": None})
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    keys = sorted(counts)
    axis.bar([str(k) for k in keys], [counts[k] for k in keys], color="#55a868")
    axis.set_xlabel("subjects per sample")
    axis.set_ylabel("samples")
    axis.set_title("Subject counts")
    figure.tight_layout()
    figure.savefig(folder / "subject_counts.png", metadata={"Software": None})
    plt.close(figure)


def card(spec: BuildSpec, stats: dict) -> str:
    header = {
        "pretty_name": f"MUSIC multi-subject training set ({spec.name})",
        "task_categories": ["text-to-image", "image-to-image"],
        "tags": ["multi-subject", "in-context-generation", "music-pipeline", "synthetic"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
    }
    models = "\n".join(f"| {name} | {r.backend} | `{r.model}` |" for name, r in sorted(spec.roles.items()))
    funnel_rows = "\n".join(
        f"| {s['stage']} | {s['rows_in']} | {s['rows_out']} | {', '.join(f'{k}: {v}' for k, v in s['dropped'].items()) or '-'} |"
        for s in stats["funnel"]
    )
    tiny = any(r.model.startswith("zoo:") for r in spec.roles.values())
    warning = (
        "\n**Built with the tiny model zoo**: random models, so images are noise and texts are random. This build "
        "proves the machinery; real checkpoints give real data.\n" if tiny else ""
    )
    return (
        f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n"
        f"# MUSIC training set: {spec.name}\n{warning}\n"
        "Multi-subject in-context generation samples made by the MUSIC data pipeline (arXiv 2604.07422): "
        "a target image, one re-rendered reference image per subject, an instruction naming subjects by `<sN>` "
        "tags, a vision chain of thought (JSON) and an 8x8 layout of subject IDs (0 = background).\n\n"
        f"- samples: {stats['samples']}\n- subject counts: {stats['subject_counts']}\n"
        f"- spec hash: `{stats['spec_hash']}`\n- code version: `{stats['code_version']}`\n- seed: {spec.seed}\n\n"
        f"## Models\n\n| role | backend | model |\n|---|---|---|\n{models}\n\n"
        f"## Funnel\n\n| stage | in | out | dropped |\n|---|---|---|---|\n{funnel_rows}\n\n"
        "## Columns\n\n`id`, `source_id` (the undecimated sample it derives from), `num_subjects`, `image` (target), "
        "`caption`, `instruction`, `cot`, `layout` (64 ints), `layout_text`, and per subject: `subject_ids`, "
        "`categories`, `boxes` (normalised xyxy), `masks` (COCO RLE), `regions` (mask or box used for the layout), "
        "`references` (images).\n"
    )


def published_stats(spec: BuildSpec, fingerprint: str) -> dict | None:
    """The stats of the published dataset when it was published with this fingerprint."""
    out = build_dir(spec) / "dataset"
    marker = out / "publish.done.json"
    if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        return {**json.loads((out / "stats.json").read_text()), "skipped": True}
    return None


def publish(spec: BuildSpec, filter_dir: Path, shards: int, summaries: list[dict], fingerprint: str) -> dict:
    """Write the published dataset (or return its stats when this fingerprint is already published)."""
    if stats := published_stats(spec, fingerprint):
        return stats
    out = build_dir(spec) / "dataset"
    rows = [row for shard in range(shards) for row in read_rows(filter_dir / f"{shard_name(shard)}.parquet")]
    drops: Counter = Counter()
    duplicates = near_duplicate_sources(rows, spec.filter.near_duplicate_clip)
    drops["near_duplicate"] = sum(r["source_id"] in duplicates for r in rows)
    rows = sorted((r for r in rows if r["source_id"] not in duplicates), key=lambda r: r["id"])
    if spec.publish.max_samples is not None and len(rows) > spec.publish.max_samples:
        drops["over_max_samples"] = len(rows) - spec.publish.max_samples
        rows = rows[: spec.publish.max_samples]
    drops = Counter({k: v for k, v in drops.items() if v})
    staging = build_dir(spec) / f".dataset-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    files = max(1, -(-len(rows) // spec.publish.rows_per_file))
    for number in range(files):
        chunk = rows[number * spec.publish.rows_per_file:(number + 1) * spec.publish.rows_per_file]
        _write_parquet([published_row(r) for r in chunk], staging / "data" / f"train-{number:05d}-of-{files:05d}.parquet")
    counts = Counter(r["num_subjects"] for r in rows)
    stats = {
        "name": spec.name, "samples": len(rows), "sources": len({r["source_id"] for r in rows}),
        "subject_counts": {str(k): counts[k] for k in sorted(counts)},
        "funnel": funnel(summaries, drops, len(rows)), "spec_hash": spec.spec_hash(), "code_version": code_version(),
        "fingerprint": fingerprint,
    }
    (staging / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    (staging / "README.md").write_text(card(spec, stats))
    _plots(staging / "plots", stats["funnel"], counts)
    (staging / "publish.done.json").write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    # Swap the finished folder in; a reader never sees a half-written dataset.
    old = build_dir(spec) / f".dataset-old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    return {**stats, "skipped": False}
