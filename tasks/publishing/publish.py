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
at a time, so memory is one shard and one file's rows plus an embedding a source (twice while
`nearest_earlier` scores the published sources), whatever the sample count."""
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
from data_specs.roles import model_kind
from data_specs.schemas import DROPPED
from music_model.roles.hub import licence_of
from music_model.subjects.preview import from_published, render_sheet
from safe_files import write_atomic
from tasks.engine.build_paths import build_dir, recorded, stage_dir
from tasks.engine.contract import read_rows, stable_int, write_table
from tasks.engine.image_store import ImageStore
from tasks.engine.markers import shard_name
from tasks.publishing import releases, waves
from tasks.stages import published_schema, published_scores

PREVIEW_SAMPLES = 6
# Bumped when the published files change for the same inputs. 2: the quality-score columns. 3: the
# content_hash column, and files cut per filter shard (a release shares the files of unchanged shards).
PUBLISH_VERSION = 3


def publish_fingerprint(spec: BuildSpec, upstream: str, shards: int) -> str:
    """What the published files depend on: the publish section, the near-duplicate threshold (the
    filter section's, read only here), the target, the filter stage's fingerprint and how many of
    its shards there are (the fingerprint does not count sources)."""
    payload = {"version": PUBLISH_VERSION, "publish": spec.publish.model_dump(), "near_duplicate": spec.filter.near_duplicate_clip,
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


def near_duplicate_scores(embeddings: dict[str, np.ndarray], threshold: float) -> dict[str, tuple[str, float]]:
    """source_id -> (the earlier kept source most like it, their CLIP cosine) for every source but
    the first, sources taken in ID order: the cosine publish holds to `threshold`. A source at or
    above it is a near duplicate, and later sources are not compared with it."""
    kept_ids: list[str] = []
    kept_vectors: list[np.ndarray] = []
    nearest = {}
    for source in sorted(embeddings):
        vector = embeddings[source]
        if kept_vectors:
            scores = np.stack(kept_vectors) @ vector
            best = int(np.argmax(scores))
            nearest[source] = (kept_ids[best], float(scores[best]))
            if scores[best] >= threshold:
                continue
        kept_ids.append(source)
        kept_vectors.append(vector)
    return nearest


def near_duplicate_sources(embeddings: dict[str, np.ndarray], threshold: float) -> dict[str, tuple[str, float]]:
    """source_id -> (the earlier kept source it nearly duplicates, their CLIP cosine >= threshold),
    sources taken in ID order."""
    return {source: near for source, near in near_duplicate_scores(embeddings, threshold).items() if near[1] >= threshold}


def nearest_earlier(embeddings: dict[str, np.ndarray], sources: list[str], block: int = 1024) -> dict[str, float]:
    """The published `near_duplicate_clip`: per source of `sources` (the published ones), the highest
    CLIP cosine (clipped to [-1, 1]) of its target to the target of any other of them with a lower
    ID; -1.0, the lowest cosine, for the first. So keeping the rows under t leaves no two sources at
    t or above and keeps the lowest ID of each group (a cosine to every other source would drop the
    whole group). Computed a block of sources at a time (memory: block x sources)."""
    order = sorted(set(sources))
    if not order:
        return {}
    matrix = np.stack([embeddings[source] for source in order])
    nearest = np.full(len(order), -1.0, np.float32)
    for start in range(1, len(order), block):
        stop = min(start + block, len(order))
        similarity = matrix[start:stop] @ matrix[:stop].T
        similarity[np.arange(stop)[None, :] >= np.arange(start, stop)[:, None]] = -np.inf  # itself and later IDs
        nearest[start:stop] = np.clip(similarity.max(1), -1.0, 1.0)
    return dict(zip(order, nearest.tolist()))


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


def yaml_header(header: dict) -> str:
    """A card's YAML front matter, as the Hub reads it."""
    return f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n"


def published_result(folder: Path, fingerprint: str, spec: BuildSpec, target: int | None) -> dict | None:
    """What the publication in `folder` recorded, when it was made with this fingerprint; else the
    result of the release a publish with this fingerprint made (`releases.reuse`: an accepted one
    becomes current again, as after a rollback; a rejected one is judged by the spec's gates); else None."""
    try:
        done = json.loads((folder / releases.DONE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        done = {}
    return done["result"] if done.get("fingerprint") == fingerprint else releases.reuse(folder, fingerprint, spec.release.gates, target)


def publish_folder(folder: Path, fingerprint: str, write: Callable[[Path], dict], spec: BuildSpec, target: int | None) -> dict:
    """The one way a publication is written: `write(staging)` fills a staging folder beside `folder`
    and returns the result; the staging folder then becomes a release (`tasks.publishing.releases.commit`) and,
    when it passes the spec's gates, `folder` is swapped whole for it, so a reader never sees a
    half-written publication. `target`: the sample count the `min_samples: target` gate asks for.
    The result carries its release (`release.status`: accepted or rejected)."""
    staging = folder.with_name(f".{folder.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        result = write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    meta = {"spec_hash": spec.spec_hash(), "code_version": code_version(), "models": recorded(spec),
            "inputs": releases.stage_inputs(spec)}
    return releases.commit(folder, staging, fingerprint, result, meta, spec.release.gates, target, spec.score_columns)


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


def published_row(row: dict, computed: dict | None = None) -> dict:
    """A filter row as published, with every stage's published scores (`Stage(published=...)`);
    `computed`: the scores publish computes (`near_duplicate_clip`: its source's, `nearest_earlier`)."""
    subjects = row["subjects"]
    published = {
        "id": row["id"], "source_id": row["source_id"], "num_subjects": row["num_subjects"], "image": row["image"],
        "caption": row["caption"], "instruction": row["instruction"], "cot": row["cot"], "layout": row["layout"],
        "layout_text": row["layout_text"], "subject_ids": [s["id"] for s in subjects],
        "categories": [s["category"] for s in subjects], "boxes": [s["box"] for s in subjects],
        "masks": [s["mask"] for s in subjects], "regions": [s["region"] for s in subjects],
        "references": [s["reference"] for s in subjects],
    }
    for score in published_scores():
        if score.source is None:
            published[score.column] = (computed or {}).get(score.column)
        elif score.per == "subject":
            published[score.column] = [s[score.source] for s in subjects]
        else:
            published[score.column] = row[score.source]
    return {**published, "content_hash": releases.row_hash(published)}


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


def quality_scores_section(spec: BuildSpec) -> str:
    """The card's section on the quality-score columns: what each means, its range, what this build
    kept and a one-line `datasets` filter. Only the spec goes in, so one spec gives one text."""
    rows = [(score.column, score.per, score.meaning, score.span, score.kept(spec)) for score in published_scores()]
    table = "\n".join(f"| `{name}` | {per} | {meaning} | {span} | {kept} |" for name, per, meaning, span, kept in rows)
    return (
        "\n## Quality scores\n\nScores to filter the set on, as the pipeline computed them: a list per subject "
        "(aligned with `subject_ids`) or a value per sample. Higher is better for all but `near_duplicate_clip`. "
        "A null is a score the stage did not record.\n\n"
        f"| column | per | what it is | range | this build kept |\n|---|---|---|---|---|\n{table}\n\n"
        "`near_duplicate_clip` looks only at lower IDs, so keeping the rows under t leaves no two published sources with "
        "a CLIP cosine of t or more and keeps the first (lowest `source_id`) of each group. Filters, one line each:\n\n"
        "```python\n"
        "ds = ds.filter(lambda r: min(r[\"verify_confidences\"]) >= 0.8)  # every subject confidently verified\n"
        "ds = ds.filter(lambda r: min(r[\"reference_dino\"]) >= 0.5)      # every reference keeps its identity\n"
        "ds = ds.filter(lambda r: r[\"near_duplicate_clip\"] < 0.9)       # no two sources left at CLIP cosine 0.9 or more\n"
        "```\n"
    )


OBJECTS365_LICENCE = {"source": "Objects365", "license": "cc-by-4.0", "name": "Creative Commons Attribution 4.0",
                      "outputs": "the category names (Shao et al., ICCV 2019) are used as prompts and labels"}


def provenance(spec: BuildSpec) -> dict[str, dict]:
    """Each role's model, source, commit and licence, as the build's preflight recorded them (a set
    published outside the build flow: the licences, commits unknown)."""
    made_with = recorded(spec) or {}
    return {name: made_with.get(name) or {"model": role.model, "source": model_kind(role.model), "commit": role.revision,
                                          "licence": licence_of(role)}
            for name, role in sorted(spec.roles.items())}


def licence_header(models: dict[str, dict], categories: dict) -> dict:
    """The card's `license:`: the one licence of every model and the categories, else `other`."""
    ids = {m["licence"].get("license", "unknown") for m in models.values()} | {categories["license"]}
    if len(ids) == 1:
        return {"license": ids.pop()}
    return {"license": "other", "license_name": "mixed: see the Licences section of this card"}


def licences_section(models: dict[str, dict], categories: dict) -> str:
    rows = "\n".join(f"| {name} | `{m['model']}` | {m['licence'].get('name', '-')} | {m['licence'].get('outputs', '-')} |"
                     for name, m in models.items())
    return (
        "## Licences\n\nEvery model that made or chose part of this data has its own licence, and the set carries "
        "what each says about its outputs. As the model cards state them (not legal advice: read each licence before "
        "you use or share the data):\n\n| role | model | licence | what it says of the outputs |\n|---|---|---|---|\n"
        f"{rows}\n| categories | {categories['source']} | {categories['name']} | {categories['outputs']} |\n\n"
        "The target images are the `t2i` role's outputs and the references the `editor` role's, so their terms "
        "apply to `image` and `references`; the texts are the `llm` and `vlm` roles' outputs.\n\n"
    )


def commit_cell(model: dict) -> str:
    if model["source"] in ("hub", "cache"):
        return f"`{model['commit']}`" if model["commit"] else "not recorded"
    if model["source"] == "zoo":
        return f"zoo entry sha256 `{model['commit'][:16]}`" if model["commit"] else "zoo"
    return model["source"]  # a local folder or a random-weight architecture: no revision


def card(spec: BuildSpec, stats: dict) -> str:
    models_used = provenance(spec)
    categories = (OBJECTS365_LICENCE if spec.categories == "objects365" else
                  {"source": f"`{spec.categories}`", "license": "unknown", "name": "as the category file's source states",
                   "outputs": "used as prompts and labels"})
    header = {
        "pretty_name": f"MUSIC multi-subject training set ({spec.name})",
        **licence_header(models_used, categories),
        "task_categories": ["text-to-image", "image-to-image"],
        "tags": ["multi-subject", "in-context-generation", "music-pipeline", "synthetic"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
    }
    ran = stats.get("execution", {})
    models = "\n".join(f"| {name} | {r.backend} | `{r.model}` | {commit_cell(models_used[name])} | {'; '.join(ran.get(name, [])) or '-'} |"
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
        f"## Models\n\n| role | backend | model | revision | run with (not part of the content) |\n|---|---|---|---|---|\n{models}\n\n"
        + licences_section(models_used, categories) +
        f"## Funnel\n\n| stage | in | out | dropped |\n|---|---|---|---|\n{funnel_rows}\n\n"
        "## Columns\n\n`id`, `source_id` (the undecimated sample it derives from), `num_subjects`, `image` (target), "
        "`caption`, `instruction`, `cot`, `layout` (64 ints), `layout_text`, and per subject: `subject_ids`, "
        "`categories`, `boxes` (normalised xyxy), `masks` (COCO RLE), `regions` (mask or box used for the layout), "
        "`references` (images).\n"
        + quality_scores_section(spec)
        + ("\n" + "\n".join(preview_markdown(Path("."), stats.get("preview", []))) if stats.get("preview") else "")
    )


def published_stats(spec: BuildSpec, fingerprint: str) -> dict | None:
    """The stats of the published dataset when it was published with this fingerprint."""
    stats = published_result(build_dir(spec) / "dataset", fingerprint, spec, gate_target(spec))
    return None if stats is None else {**stats, "skipped": True}


def publish(spec: BuildSpec, filter_dir: Path, shards: int, summaries: list[dict], fingerprint: str,
            made: list[int] | None = None) -> dict:
    """Write the published dataset and return its stats; whether this fingerprint is already
    published is the caller's question (`published_stats`, asked by the build flow's `publish_once`):
    publishing again makes no new release for the same data (`releases.commit`).
    `made`: a target build's sources after each wave."""
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
        # A file per filter shard (split at rows_per_file), rows read a shard at a time and written as they come (memory:
        # one shard), so a rebuild that changes some shards leaves the others' files byte-identical for releases to share.
        per_file = spec.publish.rows_per_file
        chunks = [ids[start:start + per_file] for _, run in itertools.groupby((r["id"] for r in rows), key=index.shard_of.get)
                  for ids in [list(run)] for start in range(0, len(ids), per_file)] or [[]]
        previews = set(preview_ids(spec.seed, [r["id"] for r in rows]))
        near = nearest_earlier(index.embeddings, [r["source_id"] for r in rows])
        preview_rows = {}
        stream = stream_rows(filter_dir, index, [r["id"] for r in rows], ImageStore.of_stage_dir(filter_dir))
        schema = published_schema()
        for number, ids in enumerate(chunks):
            path = staging / "data" / f"train-{number:05d}-of-{len(chunks):05d}.parquet"
            with pq.ParquetWriter(path, schema, compression="zstd") as writer:
                batch = [published_row(row, {"near_duplicate_clip": near[row["source_id"]]}) for row in (next(stream) for _ in ids)]
                preview_rows.update((r["id"], r) for r in batch if r["id"] in previews)
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        sheets = [(i, render_sheet(from_published(preview_rows[i]))) for i in sorted(previews)]
        written = {**stats, "preview": [p.relative_to(staging).as_posix() for p in write_sheets(staging / "preview", sheets)]}
        (staging / "stats.json").write_text(json.dumps(written, indent=1) + "\n")
        (staging / "README.md").write_text(card(spec, written))
        _plots(staging / "plots", written["funnel"], counts)
        return written

    return {**publish_folder(build_dir(spec) / "dataset", fingerprint, write, spec, gate_target(spec)), "skipped": False}


def gate_target(spec: BuildSpec) -> int | None:
    """The sample count the `min_samples: target` gate asks of the training set."""
    return spec.target.samples if spec.target else spec.publish.max_samples
