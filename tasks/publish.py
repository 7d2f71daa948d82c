"""publish: drop near-duplicate sources across the build, then write the dataset in the Hugging
Face layout (`data/train-0000k-of-0000n.parquet`), its card, stats.json, report.md, plots and
`preview/<id>.png`: a sheet per sample of a fixed seeded subset (music_model.subjects.preview), so a person
judges a build's quality in a minute.

The data files, card, stats and previews depend only on the spec and the code version, so two
builds of one spec give the same bytes; timings go to report.md alone. Rows dropped here
(near_duplicate, over_max_samples) are kept with their reason in `stages/publish/<fingerprint>/dropped.parquet`,
as every stage keeps its dropped table.

Publishing streams: near-duplicates, the cap and the order are decided on the filter rows without
their images (`read_filter_index`); the rows are then read a shard at a time and written a file
at a time, so memory is one shard and one file's rows plus an embedding a source, whatever the
sample count."""
from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from data_specs.build import BuildSpec, canonical_json
from data_specs.schemas import DROPPED, PUBLISHED, PUBLISHED_FEATURES
from music_model.subjects.preview import from_published, render_sheet
from tasks import waves
from tasks.engine import ImageStore, build_dir, read_rows, shard_name, stable_int, stage_dir, write_atomic, write_table

PREVIEW_SAMPLES = 6


def publish_fingerprint(spec: BuildSpec, upstream: str, shards: int) -> str:
    """What the published files depend on: the publish section, the near-duplicate threshold (the
    filter section's, read only here), the target, the filter stage's fingerprint and how many of
    its shards there are (the fingerprint does not count sources)."""
    payload = {"publish": spec.publish.model_dump(), "near_duplicate": spec.filter.near_duplicate_clip,
               "target": spec.target.model_dump(mode="json") if spec.target else None, "upstream": upstream, "shards": shards}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def execution_settings(summaries: list[dict]) -> dict[str, list[str]]:
    """Per role, each distinct execution setting its shards ran with (a resumed build may mix them)."""
    seen: dict[str, set[str]] = {}
    for summary in summaries:
        for role, settings in summary.get("execution", {}).items():
            seen.setdefault(role, set()).add(", ".join(f"{k} {v}" for k, v in sorted(settings.items())))
    return {role: sorted(values) for role, values in sorted(seen.items())}


def code_version() -> str:
    version = metadata.version("music-pipeline")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


# What near-duplicates, caps and case selection need of a filter row: everything but its images.
INDEX_COLUMNS = ["id", "index", "source_id", "num_subjects"]


@dataclass
class FilterIndex:
    """The filter stage's rows without their images: each row's index columns and shard, and one
    CLIP embedding per source (decimated siblings share it). Memory: a few hundred bytes a row
    plus an embedding a source, whatever the images weigh."""

    rows: list[dict]
    shard_of: dict[str, int]
    embeddings: dict[str, np.ndarray]


def read_filter_index(filter_dir: Path, shards: int) -> FilterIndex:
    rows, shard_of, embeddings = [], {}, {}
    for shard in range(shards):
        table = pq.read_table(filter_dir / f"{shard_name(shard)}.parquet", columns=[*INDEX_COLUMNS, "clip_embedding"])
        vectors = table.column("clip_embedding").combine_chunks()
        values = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(table), -1) if len(table) else None
        for number, row in enumerate(table.select(INDEX_COLUMNS).to_pylist()):
            rows.append(row)
            shard_of[row["id"]] = shard
            if row["source_id"] not in embeddings:
                embeddings[row["source_id"]] = values[number].copy()
    return FilterIndex(rows, shard_of, embeddings)


def stream_rows(filter_dir: Path, index: FilterIndex, ids: list[str], store: ImageStore) -> Iterator[dict]:
    """The full rows of `ids`, in that order, with their images read from the build's store and
    inline; read a shard at a time (ids in shard order read each shard once; memory: one shard's
    rows and the images of one row)."""
    loaded, rows = None, {}
    for sample_id in ids:
        if index.shard_of[sample_id] != loaded:
            loaded = index.shard_of[sample_id]
            rows = {r["id"]: r for r in read_rows(filter_dir / f"{shard_name(loaded)}.parquet")}
        row = rows[sample_id]
        yield {**row, "image": store.embedded(row["image"]),
               "subjects": [{**s, "reference": store.embedded(s["reference"])} for s in row["subjects"]]}


def near_duplicate_sources(embeddings: dict[str, np.ndarray], threshold: float) -> dict[str, tuple[str, float]]:
    """source_id -> (the earlier kept source it nearly duplicates, their CLIP cosine >= threshold),
    sources taken in ID order."""
    kept_ids: list[str] = []
    kept_vectors: list[np.ndarray] = []
    duplicates = {}
    for source in sorted(embeddings):
        vector = embeddings[source]
        if kept_vectors:
            scores = np.stack(kept_vectors) @ vector
            best = int(np.argmax(scores))
            if scores[best] >= threshold:
                duplicates[source] = (kept_ids[best], float(scores[best]))
                continue
        kept_ids.append(source)
        kept_vectors.append(vector)
    return duplicates


def drop_near_duplicates(spec: BuildSpec, index: FilterIndex, stage: str) -> tuple[list[dict], list[dict], int]:
    """The index rows of sources no earlier kept source nearly duplicates (CLIP cosine at least the
    filter section's threshold), the dropped rows of the others with their reason (for `stage`'s
    dropped table), and how many sources were dropped."""
    threshold = spec.filter.near_duplicate_clip
    duplicates = near_duplicate_sources(index.embeddings, threshold)
    kept, dropped = [], []
    for row in index.rows:
        if row["source_id"] in duplicates:
            source, score = duplicates[row["source_id"]]
            dropped.append(dropped_row(row, stage, "near_duplicate", f"CLIP cosine {score:.4f} >= {threshold} to source {source}"))
        else:
            kept.append(row)
    return kept, dropped, len(duplicates)


def publishable(spec: BuildSpec, filter_dir: Path, shards: int) -> list[dict]:
    """The index rows of the first `shards` filter shards that publish could publish: near-duplicate
    sources removed as publish removes them (no image is read)."""
    return drop_near_duplicates(spec, read_filter_index(filter_dir, shards), "publish")[0]


def dropped_row(row: dict, stage: str, reason: str, detail: str) -> dict:
    return {"id": row["id"], "index": row["index"], "stage": stage, "reason": reason, "detail": detail}


def with_features(schema: pa.Schema, features: dict) -> pa.Schema:
    """`schema` carrying the Hugging Face features, so `datasets` decodes its images as images."""
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def yaml_header(header: dict) -> str:
    """A card's YAML front matter, as the Hub reads it."""
    return f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n"


def published_result(folder: Path, fingerprint: str) -> dict | None:
    """What the publication in `folder` recorded, when it was made with this fingerprint; else None."""
    try:
        done = json.loads((folder / "publish.done.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return done.get("result") if done.get("fingerprint") == fingerprint else None


def publish_folder(folder: Path, fingerprint: str, write: Callable[[Path], dict]) -> dict:
    """The one way a publication is written: `write(staging)` fills a staging folder beside `folder`
    and returns the result; the marker (fingerprint and result) goes in last, then the staging
    folder replaces `folder` whole, so a reader never sees a half-written publication."""
    staging = folder.with_name(f".{folder.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        result = write(staging)
        (staging / "publish.done.json").write_text(json.dumps({"fingerprint": fingerprint, "result": result}, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = folder.with_name(f".{folder.name}-old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)
    return result


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


def funnel(summaries: list[dict], publish_drops: Counter, published: int) -> list[dict]:
    """Rows in, out and dropped by reason per stage, in the order of `summaries` (the flow's stage order)."""
    by_stage: dict[str, dict] = {}
    for summary in summaries:
        entry = by_stage.setdefault(summary["stage"], {"stage": summary["stage"], "rows_in": 0, "rows_out": 0, "dropped": Counter()})
        entry["rows_in"] += summary["rows_in"]
        entry["rows_out"] += summary["rows_out"]
        entry["dropped"].update(summary["dropped"])
    rows = list(by_stage.values())
    publish_in = rows[-1]["rows_out"] if rows else 0  # the last stage's output
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


def target_line(target: dict | None) -> str:
    """The card's line on a build to a target: what was asked, the waves, the yield per source."""
    if not target:
        return ""
    mix = f" (per subject count {target['mix']})" if target["mix"] else ""
    if not target["waves"]:  # published outside the build flow (a benchmark's own stages)
        return f"- built to a target of {target['samples']} samples{mix}\n"
    return (f"- built to a target of {target['samples']} samples{mix}: {target['sources_made']} sources made in "
            f"{len(target['waves'])} waves (sources after each: {target['waves']}), {target['samples_per_source']} "
            "published samples per source made\n")


def card(spec: BuildSpec, stats: dict) -> str:
    header = {
        "pretty_name": f"MUSIC multi-subject training set ({spec.name})",
        "task_categories": ["text-to-image", "image-to-image"],
        "tags": ["multi-subject", "in-context-generation", "music-pipeline", "synthetic"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
    }
    ran = stats.get("execution", {})
    models = "\n".join(f"| {name} | {r.backend} | `{r.model}` | {'; '.join(ran.get(name, [])) or '-'} |"
                       for name, r in sorted(spec.roles.items()))
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
        yaml_header(header) +
        f"# MUSIC training set: {spec.name}\n{warning}\n"
        "Multi-subject in-context generation samples made by an open implementation of the MUSIC data pipeline "
        "(arXiv 2604.07422) by the paper's recipe, with the deviations `docs/FIDELITY.md` of the pipeline's repository "
        "lists (e.g. FLUX.1 Kontext, not UNO-FLUX, re-renders the references): "
        "a target image, one re-rendered reference image per subject, an instruction naming subjects by `<sN>` "
        "tags, a vision chain of thought (JSON) and an 8x8 layout of subject IDs (0 = background).\n\n"
        f"- samples: {stats['samples']}\n- subject counts: {stats['subject_counts']}\n"
        f"- spec hash: `{stats['spec_hash']}`\n- code version: `{stats['code_version']}`\n- seed: {spec.seed}\n"
        + target_line(stats.get("target")) + "\n"
        f"## Models\n\n| role | backend | model | run with (not part of the content) |\n|---|---|---|---|\n{models}\n\n"
        f"## Funnel\n\n| stage | in | out | dropped |\n|---|---|---|---|\n{funnel_rows}\n\n"
        "## Columns\n\n`id`, `source_id` (the undecimated sample it derives from), `num_subjects`, `image` (target), "
        "`caption`, `instruction`, `cot`, `layout` (64 ints), `layout_text`, and per subject: `subject_ids`, "
        "`categories`, `boxes` (normalised xyxy), `masks` (COCO RLE), `regions` (mask or box used for the layout), "
        "`references` (images).\n"
        + ("\n" + "\n".join(preview_markdown(Path("."), stats.get("preview", []))) if stats.get("preview") else "")
    )


def published_stats(spec: BuildSpec, fingerprint: str) -> dict | None:
    """The stats of the published dataset when it was published with this fingerprint."""
    stats = published_result(build_dir(spec) / "dataset", fingerprint)
    return None if stats is None else {**stats, "skipped": True}


def publish(spec: BuildSpec, filter_dir: Path, shards: int, summaries: list[dict], fingerprint: str,
            made: list[int] | None = None) -> dict:
    """Write the published dataset (or return its stats when this fingerprint is already published).
    `made`: a target build's sources after each wave."""
    if stats := published_stats(spec, fingerprint):
        return stats
    index = read_filter_index(filter_dir, shards)
    kept, dropped, _ = drop_near_duplicates(spec, index, "publish")
    rows = sorted(kept, key=lambda r: r["id"])
    cap = spec.publish.max_samples
    if spec.target is not None:
        rows, over = waves.choose(spec, rows)
        dropped += [dropped_row(r, "publish", "over_target", f"beyond target.samples {spec.target.samples}"
                                + (f" (mix {spec.target.mix})" if spec.target.mix else "")) for r in over]
    elif cap is not None and len(rows) > cap:
        dropped += [dropped_row(r, "publish", "over_max_samples", f"sample {rank + 1} of {len(rows)} by id; max_samples {cap}")
                    for rank, r in enumerate(rows) if rank >= cap]
        rows = rows[:cap]
    write_table(dropped, DROPPED, stage_dir(spec, "publish", fingerprint) / "dropped.parquet")
    counts = Counter(r["num_subjects"] for r in rows)
    stats = {
        "name": spec.name, "samples": len(rows), "sources": len({r["source_id"] for r in rows}),
        "subject_counts": {str(k): counts[k] for k in sorted(counts)},
        "funnel": funnel(summaries, Counter(d["reason"] for d in dropped), len(rows)), "spec_hash": spec.spec_hash(),
        "code_version": code_version(), "fingerprint": fingerprint, "execution": execution_settings(summaries),
    }
    if spec.target is not None:
        made = made or []
        stats["target"] = {"samples": spec.target.samples, "mix": {str(k): v for k, v in waves.wanted(spec).items()} if spec.target.mix else None,
                           "waves": made, "sources_made": made[-1] if made else None,
                           "samples_per_source": round(len(rows) / made[-1], 4) if made else None}

    def write(staging: Path) -> dict:
        (staging / "data").mkdir()
        # Rows read a shard at a time and written as they come, a row group per (file, shard): memory is one shard.
        per_file, files = spec.publish.rows_per_file, max(1, -(-len(rows) // spec.publish.rows_per_file))
        previews = set(preview_ids(spec.seed, [r["id"] for r in rows]))
        preview_rows = {}
        stream = stream_rows(filter_dir, index, [r["id"] for r in rows], ImageStore.of_stage_dir(filter_dir))
        schema = with_features(PUBLISHED, PUBLISHED_FEATURES)
        for number in range(files):
            ids = [r["id"] for r in rows[number * per_file:(number + 1) * per_file]]
            path = staging / "data" / f"train-{number:05d}-of-{files:05d}.parquet"
            with pq.ParquetWriter(path, schema, compression="zstd") as writer:
                for _, run in itertools.groupby(ids, key=index.shard_of.get):  # consecutive ids of one shard
                    batch = [published_row(next(stream)) for _ in run]
                    preview_rows.update((r["id"], r) for r in batch if r["id"] in previews)
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        sheets = [(i, render_sheet(from_published(preview_rows[i]))) for i in sorted(previews)]
        written = {**stats, "preview": [p.relative_to(staging).as_posix() for p in write_sheets(staging / "preview", sheets)]}
        (staging / "stats.json").write_text(json.dumps(written, indent=1) + "\n")
        (staging / "README.md").write_text(card(spec, written))
        _plots(staging / "plots", written["funnel"], counts)
        return written

    return {**publish_folder(build_dir(spec) / "dataset", fingerprint, write), "skipped": False}
