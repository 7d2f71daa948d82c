"""publish: drop near-duplicate sources across the build, then write the dataset in the Hugging
Face layout (`data/train-0000k-of-0000n.parquet`), its card, stats.json, report.md, plots and
`preview/<id>.png`: a sheet per sample of a fixed seeded subset (music_model.subjects.preview), so a person
judges a build's quality in a minute.

The data files, card, stats and previews depend only on the spec and the code version, so two
builds of one spec give the same bytes; timings go to report.md alone. Rows dropped here
(near_duplicate, over_max_samples) are kept with their reason in `stages/publish/<fingerprint>/dropped.parquet`,
as every stage keeps its dropped table."""
from __future__ import annotations

import base64
import io
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
from PIL import Image

from data_specs.build import BuildSpec
from data_specs.schemas import DROPPED, PUBLISHED, PUBLISHED_FEATURES
from music_model.subjects.preview import from_published, render_sheet
from tasks.engine import build_dir, read_rows, shard_name, stable_int, stage_dir, write_atomic, write_table

PREVIEW_SAMPLES = 6
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


def near_duplicate_sources(rows: list[dict], threshold: float) -> dict[str, tuple[str, float]]:
    """source_id -> (the earlier kept source it nearly duplicates, their CLIP cosine >= threshold)."""
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
                duplicates[source] = (kept_ids[best], float(scores[best]))
                continue
        kept_ids.append(source)
        kept_vectors.append(vector)
    return duplicates


def preview_ids(seed: int, ids: list[str], count: int = PREVIEW_SAMPLES) -> list[str]:
    """A fixed random subset of `ids`: the same spec previews the same samples on every rebuild."""
    return sorted(sorted(ids, key=lambda i: stable_int(seed, i, "preview"))[:count])


def write_sheets(folder: Path, sheets: list[tuple[str, Image.Image]]) -> list[Path]:
    """Each (id, sheet) written atomically as `<folder>/<id>.png`; the paths."""
    paths = []
    for sample_id, sheet in sheets:
        path = folder / f"{sample_id}.png"
        write_atomic(path, lambda tmp: sheet.save(tmp, format="PNG"))
        paths.append(path)
    return paths


def preview_markdown(folder: Path, previews: list[str], inline: bool = False, width: int = 400) -> list[str]:
    """Markdown lines showing the preview sheets: linked relative to `folder` (the card, report.md),
    or inline as small JPEGs (a Prefect artifact: the UI cannot reach the build's folder)."""
    if not previews:
        return []
    lines = ["## Preview", "", f"A sheet per sample of a fixed random subset ({len(previews)}): the target with its boxes and "
             "`<sN>` tags as the annotating VLM saw them, the 8x8 layout, every reference, the instruction and the CoT.", ""]
    for relative in previews:
        if inline:
            with Image.open(folder / relative) as sheet:
                small = sheet.convert("RGB").resize((width, round(sheet.height * width / sheet.width)), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            small.save(buffer, format="JPEG", quality=80)
            lines.append(f"![{Path(relative).stem}](data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()})")
        else:
            lines.append(f"![{Path(relative).stem}]({relative})")
    return lines + [""]


def _dropped(row: dict, reason: str, detail: str) -> dict:
    return {"id": row["id"], "index": row["index"], "stage": "publish", "reason": reason, "detail": detail}


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
        "Multi-subject in-context generation samples made by an open implementation of the MUSIC data pipeline "
        "(arXiv 2604.07422) by the paper's recipe, with the deviations `docs/FIDELITY.md` of the pipeline's repository "
        "lists (e.g. FLUX.1 Kontext, not UNO-FLUX, re-renders the references): "
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
        + ("\n" + "\n".join(preview_markdown(Path("."), stats.get("preview", []))) if stats.get("preview") else "")
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
    duplicates = near_duplicate_sources(rows, spec.filter.near_duplicate_clip)
    dropped = []
    for row in rows:
        if row["source_id"] in duplicates:
            kept, score = duplicates[row["source_id"]]
            dropped.append(_dropped(row, "near_duplicate", f"CLIP cosine {score:.4f} >= {spec.filter.near_duplicate_clip} to source {kept}"))
    rows = sorted((r for r in rows if r["source_id"] not in duplicates), key=lambda r: r["id"])
    cap = spec.publish.max_samples
    if cap is not None and len(rows) > cap:
        dropped += [_dropped(r, "over_max_samples", f"sample {rank + 1} of {len(rows)} by id; max_samples {cap}")
                    for rank, r in enumerate(rows) if rank >= cap]
        rows = rows[:cap]
    drops = Counter(d["reason"] for d in dropped)
    write_table(dropped, DROPPED, stage_dir(spec, "publish", fingerprint) / "dropped.parquet")
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
    by_id = {r["id"]: r for r in rows}
    sheets = [(i, render_sheet(from_published(published_row(by_id[i])))) for i in preview_ids(spec.seed, list(by_id))]
    stats["preview"] = [p.relative_to(staging).as_posix() for p in write_sheets(staging / "preview", sheets)]
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
