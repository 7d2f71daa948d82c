"""Evaluation work: plain functions over one shard (generate DreamBench images, score DreamBench
images, score multi-subject cases), the aggregation that writes every output, and thin Prefect task
wrappers. The plain functions need no Prefect: tests, notebooks and other orchestrators call them.

One evaluation writes to `<output_root>/<name>/`::

    plan.parquet                                   the generated images matched to the benchmark
    shards/<fingerprint>/part-00003.*.parquet      one shard's scores and drops, then its marker
    shards/<fingerprint>/part-00003.done.json      (a rerun with the same inputs skips done shards)
    scores/images.parquet | scores/candidates.parquet   one row per scored image
    scores/subjects.parquet                        per subject (DreamBench) / per subject per image (cases)
    scores/by_subject_count.parquet, scores/passn.parquet
    dropped.parquet                                every input left out, with its reason
    summary.json, report.md, plots/*.png

Scores are raw cosines (`music_model.scoring.metrics.SCALE`), stated in summary.json and report.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from data_specs.eval import (CANDIDATE_SCORES, CASE_DROPS, DREAMBENCH_DROPS, DREAMBENCH_SCORES, PUBLISHED,
                             PUBLISHED_SOURCE, SUBJECT_SCORES, EvalSpec)
from music_model.roles import load_role, thread_model_loads
from music_model.scoring.dreambench import DreamBench, GeneratedImage, Scan, coverage, generate_missing, load_dreambench, score_generated, summarise
from music_model.scoring.metrics import METRICS, PROTOCOL, SCALE, Scorer
from music_model.scoring.multisubject import CASE_METRICS, by_subject_count, decode_case, score_cases
from music_model.scoring.passn import passn_curve
from tasks.engine import shard_name, write_atomic, write_table

PLAN = pa.schema([("subject", pa.string()), ("prompt_index", pa.int32()), ("sample", pa.int32()), ("path", pa.string())])
LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "uno_dino": "DINO (UNO)", "uno_clip_i": "CLIP-I (UNO)",
          "grounded_dino": "grounded DINO", "grounded_clip_i": "grounded CLIP-I", "missing_rate": "missing rate",
          "worst_dino": "worst-subject DINO"}


# --- shards ---------------------------------------------------------------------------------------


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def fingerprint(spec: EvalSpec, benchmark: str, inputs: str) -> str:
    """What a shard's scores depend on: the scoring models, the grounding parameters, the inputs."""
    payload = {"benchmark": benchmark, "roles": {k: v.model_dump() for k, v in sorted(spec.roles.items())},
               "grounding": spec.grounding.model_dump(), "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def files_digest(paths: list[Path]) -> str:
    """Cheap content identity of files: path, size and modification time."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def done_shard(work_dir: Path, shard: int) -> dict | None:
    """The marker of a shard already scored with these inputs, or None."""
    marker = work_dir / f"{shard_name(shard)}.done.json"
    return {**json.loads(marker.read_text()), "skipped": True} if marker.exists() else None


def _finish_shard(work_dir: Path, shard: int, summary: dict) -> dict:
    write_atomic(work_dir / f"{shard_name(shard)}.done.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    return {**summary, "skipped": False}


def write_plan(scan: Scan, path: Path) -> None:
    rows = [{"subject": i.subject, "prompt_index": i.prompt_index, "sample": i.sample, "path": str(i.path)} for i in scan.images]
    write_table(rows, PLAN, path)


def generate_dreambench_shard(spec_json: str, bench_root: str, images_dir: str, subjects: list[str], shard: int) -> dict:
    """Render the grid cells of `subjects` that have no image yet with the spec's generator."""
    spec = EvalSpec.model_validate_json(spec_json)
    params = spec.generation
    bench = load_dreambench(bench_root, check_images=False)
    start, loads = time.perf_counter(), thread_model_loads()
    prompts = params.prompt_indices or list(range(min(len(bench.templates(s)) for s in subjects)))
    counts = generate_missing(load_role(spec.generator), bench, images_dir, subjects, prompts, params.images_per_prompt,
                              params.width, params.height, params.seed, params.unique_token, params.reference_index)
    return {"shard": shard, "subjects": subjects, **counts, "seconds": round(time.perf_counter() - start, 3),
            "model_loads": thread_model_loads() - loads}


def score_dreambench_shard(spec_json: str, bench_root: str, plan_path: str, subjects: list[str], shard: int,
                           work_dir: str, with_selection: bool) -> dict:
    """Score every planned image of `subjects` (references and images embedded once, in batches)."""
    work = Path(work_dir)
    if done := done_shard(work, shard):
        return done
    spec = EvalSpec.model_validate_json(spec_json)
    start, loads = time.perf_counter(), thread_model_loads()
    bench = load_dreambench(bench_root, check_images=False)
    wanted = set(subjects)
    images = [GeneratedImage(r["subject"], r["prompt_index"], r["sample"], Path(r["path"]))
              for r in pq.read_table(plan_path).to_pylist() if r["subject"] in wanted]
    scorer = Scorer.from_specs(spec.roles["dino"], spec.roles["clip"], spec.roles["clip_select"] if with_selection else None)
    rows, drops = score_generated(scorer, bench, images, with_selection)
    write_table(rows, DREAMBENCH_SCORES, work / f"{shard_name(shard)}.scores.parquet")
    write_table(drops, DREAMBENCH_DROPS, work / f"{shard_name(shard)}.dropped.parquet")
    return _finish_shard(work, shard, {
        "shard": shard, "rows_in": len(images), "scored": len(rows), "dropped": dict(Counter(d["reason"] for d in drops)),
        "seconds": round(time.perf_counter() - start, 3), "model_loads": thread_model_loads() - loads,
    })


def read_row_range(path: str | Path, start: int, stop: int) -> list[dict]:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    file = pq.ParquetFile(path)
    groups, first, offset = [], None, 0
    for g in range(file.num_row_groups):
        size = file.metadata.row_group(g).num_rows
        if offset + size > start and offset < stop:
            groups.append(g)
            first = offset if first is None else first
        offset += size
    if not groups:
        return []
    table = file.read_row_groups(groups)
    return table.slice(start - first, stop - start).to_pylist()


def score_cases_shard(spec_json: str, cases_path: str, start: int, stop: int, shard: int, work_dir: str, with_selection: bool) -> dict:
    """Score cases [start, stop) of a cases table: decode (dropping what does not decode, with the
    reason), then UNO-style, CLIP-T, grounded and selector scores in batched passes."""
    work = Path(work_dir)
    if done := done_shard(work, shard):
        return done
    spec = EvalSpec.model_validate_json(spec_json)
    begin, loads = time.perf_counter(), thread_model_loads()
    base_dir = Path(cases_path).expanduser().resolve().parent
    rows = read_row_range(cases_path, start, stop)
    cases, drops = [], []
    for row in rows:
        case, case_drops = decode_case(row, base_dir)
        drops.extend(case_drops)
        if case is not None:
            cases.append(case)
    candidate_rows, subject_rows = [], []
    if cases:
        scorer = Scorer.from_specs(spec.roles["dino"], spec.roles["clip"], spec.roles["clip_select"] if with_selection else None)
        candidate_rows, subject_rows = score_cases(scorer, load_role(spec.roles["detector"]), cases, spec.grounding, with_selection)
    write_table(candidate_rows, CANDIDATE_SCORES, work / f"{shard_name(shard)}.candidates.parquet")
    write_table(subject_rows, SUBJECT_SCORES, work / f"{shard_name(shard)}.subjects.parquet")
    write_table(drops, CASE_DROPS, work / f"{shard_name(shard)}.dropped.parquet")
    return _finish_shard(work, shard, {
        "shard": shard, "rows_in": len(rows), "cases": len(cases), "scored": len(candidate_rows),
        "dropped": dict(Counter(d["reason"] for d in drops)), "seconds": round(time.perf_counter() - begin, 3),
        "model_loads": thread_model_loads() - loads,
    })


def _gather(work_dir: Path, shards: int, kind: str, schema: pa.Schema) -> list[dict]:
    rows = []
    for shard in range(shards):
        rows.extend(pq.read_table(work_dir / f"{shard_name(shard)}.{kind}.parquet", schema=schema).to_pylist())
    return rows


# --- aggregation and outputs ------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """`value` with NaN floats as None (JSON has no NaN) and numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(json_safe(value), indent=1) + "\n"))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _with_ci(mean: float, low: float, high: float) -> str:
    return "—" if math.isnan(mean) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> list[str]:
    if not rows:
        return ["(none)"]
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def published_note(benchmark: str) -> list[str]:
    """What the paper's rows in a report are: published figures of another model (on another
    benchmark, for MSIC), shown for context, never as a like-for-like comparison."""
    differs = {"dreambench": "the benchmark is the same public DreamBench (a subset of its subjects gives other numbers), "
                             "but the model is not",
               "msic": "neither the model nor the benchmark is the same: this MSIC is a regeneration by the paper's recipe "
                       "(the paper's curated set was never released)"}[benchmark]
    return [f"The paper's rows are its published figures for its own model (built on SEED-X); {differs}. "
            "They are context, not a comparison: docs/FIDELITY.md lists every difference.", ""]


def comparison_rows(benchmark: str, measured: list[dict]) -> list[dict]:
    """The paper's published rows beside ours, each labelled with where its numbers come from."""
    published = [{"row": f"{p['method']} ({p['setting']})", "source": PUBLISHED_SOURCE, "dino": p["dino"],
                  "clip_i": p["clip_i"], "clip_t": p["clip_t"]} for p in PUBLISHED if p["benchmark"] == benchmark]
    return published + measured


def _tiny_note(models: dict[str, str]) -> list[str]:
    if any(model.startswith("zoo:") for model in models.values()):
        return ["", "> **Tiny random zoo models**: the protocol is the real one; the numbers are not quality measures.", ""]
    return []


def _passn_outputs(curve: list[dict], metrics: list[str], out: Path, identity: str) -> list[str]:
    if not curve:
        return ["", "## Pass@N", "", "One image per prompt: no Pass@N curve (needs 2 or more candidates per prompt)."]
    write_table(curve, pa.schema([("selector", pa.string()), ("n", pa.int32())] + [(m, pa.float64()) for m in metrics]),
                out / "scores" / "passn.parquet")
    plot_passn(curve, metrics, out / "plots" / "passn.png")
    return ["", "## Pass@N", "",
            f"Expected score of the selected candidate when n of the N candidates are drawn (exact, every candidate used). "
            f"`clip_t`: the selector model's text-image cosine; `identity_aware`: that + weight x {identity}.", "",
            *markdown_table(curve, ["selector", "n", *metrics]), "", "![Pass@N](plots/passn.png)"]


def finish_dreambench(spec: EvalSpec, bench: DreamBench, scan: Scan, work_dir: Path, shards: int, extra: dict) -> dict:
    """Write every DreamBench output from the shards' scores; returns the summary and the tables."""
    out = spec.out_dir()
    rows = _gather(work_dir, shards, "scores", DREAMBENCH_SCORES)
    drops = scan.drops + _gather(work_dir, shards, "dropped", DREAMBENCH_DROPS)
    b = spec.bootstrap
    subject_rows, overall = summarise(rows, bench, b.samples, b.confidence, b.seed)
    unreadable = {d["path"] for d in drops}
    cover = coverage(bench, [i for i in scan.images if str(i.path) not in unreadable])
    for row, cells in zip(subject_rows, cover):
        row |= {"prompts_covered": cells["prompts_covered"], "missing_cells": cells["missing_cells"]}
    with_selection = any(not math.isnan(r["select_clip_t"]) for r in rows)
    curve = passn_curve(rows, ("subject", "prompt_index"), METRICS, "dino", spec.passn.identity_weight, "subject") if with_selection else []
    write_table(rows, DREAMBENCH_SCORES, out / "scores" / "images.parquet")
    write_table(subject_rows, pa.schema([("subject", pa.string()), ("class_noun", pa.string()), ("live", pa.bool_()),
                                         ("images", pa.int32()), ("pairs", pa.int32()), *[(m, pa.float64()) for m in METRICS],
                                         ("prompts_covered", pa.int32()), ("missing_cells", pa.int32())]),
                out / "scores" / "subjects.parquet")
    write_table(drops, DREAMBENCH_DROPS, out / "dropped.parquet")
    models = {name: role.model for name, role in spec.roles.items() if name in ("dino", "clip") or (name == "clip_select" and with_selection)}
    score_table = [{"part": part, "subjects": o["subjects"], "images": o["images"],
                    **{LABELS[m]: _with_ci(o[m]["mean"], o[m]["ci_low"], o[m]["ci_high"]) for m in METRICS}}
                   for part, o in overall.items()]
    measured = [{"row": f"this run ({spec.name}, mean over every image)", "source": "measured here",
                 **{m: overall["all"][m]["mean"] for m in METRICS}}]
    if curve:
        best = [p for p in curve if p["selector"] == "clip_t"][-1]
        measured.append({"row": f"this run (Pass@{best['n']}, clip_t selector)", "source": "measured here", **{m: best[m] for m in METRICS}})
    comparison = comparison_rows("dreambench", measured)
    plot_subjects(subject_rows, out / "plots" / "subjects.png")
    summary = {
        "benchmark": "dreambench", "name": spec.name, "scale": SCALE, "protocol": PROTOCOL, "models": models,
        "dreambench_root": str(bench.root), "subjects_in_table": len(bench.classes), "subjects_present": len(bench.subjects),
        "subjects_absent": bench.absent_subjects(),
        "images_found": len(scan.images) + len(scan.drops), "images_scored": len(rows), "dropped": dict(Counter(d["reason"] for d in drops)),
        "scores": overall, "passn": curve, "comparison": comparison, "output": str(out), **extra,
    }
    lines = [f"# DreamBench evaluation: {spec.name}", "", f"Scores are **{SCALE}**.", "",
             f"- DINO: {PROTOCOL['dino']} (`{models['dino']}`)", f"- CLIP-I: {PROTOCOL['clip_i']} (`{models['clip']}`)",
             f"- CLIP-T: {PROTOCOL['clip_t']} (`{models['clip']}`)",
             "- A generated image's DINO / CLIP-I is its mean over every real photo of its subject; a subject's score the "
             "mean over its images; the benchmark's the mean over subjects. Intervals: 95% bootstrap over each subject's images.",
             f"- Images: {len(rows)} scored of {summary['images_found']} files; subjects scored "
             f"{overall['all']['subjects']} of {len(bench.subjects)} present ({len(bench.classes)} in the table).",
             *_tiny_note(models), "", "## Scores", "", *markdown_table(score_table), "",
             "## The paper's published figures", "", *published_note("dreambench"),
             *markdown_table(comparison, ["row", "source", "dino", "clip_i", "clip_t"]), "",
             "## Per subject", "", *markdown_table(subject_rows), "", "![per subject](plots/subjects.png)"]
    lines += _passn_outputs(curve, list(METRICS), out, "DINO")
    lines += ["", "## Dropped inputs", "", *markdown_table(drops, ["path", "reason", "detail"])]
    report = "\n".join(lines) + "\n"
    write_atomic(out / "report.md", lambda tmp: tmp.write_text(report))
    write_json(out / "summary.json", summary)
    return {"summary": summary, "report": report, "tables": {"scores": score_table, "subjects": subject_rows,
            "comparison": comparison, "passn": curve, "dropped": drops}}


def finish_cases(spec: EvalSpec, cases_path: str, work_dir: Path, shards: int, cases_in: int, extra: dict) -> dict:
    """Write every multi-subject output from the shards' scores; returns the summary and the tables."""
    out = spec.out_dir()
    candidates = _gather(work_dir, shards, "candidates", CANDIDATE_SCORES)
    subjects = _gather(work_dir, shards, "subjects", SUBJECT_SCORES)
    drops = _gather(work_dir, shards, "dropped", CASE_DROPS)
    b = spec.bootstrap
    counts = by_subject_count(candidates, b.samples, b.confidence, b.seed) if candidates else []
    with_selection = any(not math.isnan(r["select_clip_t"]) for r in candidates)
    passn_metrics = ["uno_dino", "uno_clip_i", "clip_t", "grounded_dino", "missing_rate"]
    curve = passn_curve(candidates, ("case_id",), passn_metrics, "grounded_dino", spec.passn.identity_weight) if with_selection else []
    write_table(candidates, CANDIDATE_SCORES, out / "scores" / "candidates.parquet")
    write_table(subjects, SUBJECT_SCORES, out / "scores" / "subjects.parquet")
    write_table(drops, CASE_DROPS, out / "dropped.parquet")
    if counts:
        pq.write_table(pa.Table.from_pylist(counts), out / "scores" / "by_subject_count.parquet")
        plot_by_count(counts, out / "plots" / "by_subject_count.png")
    models = {name: role.model for name, role in spec.roles.items() if name != "clip_select" or with_selection}
    overall = counts[-1] if counts else {}
    count_table = [{"subjects": r["subjects"], "cases": r["cases"], "images": r["images"],
                    **{LABELS[m]: _with_ci(r[m], r[f"{m}_ci_low"], r[f"{m}_ci_high"]) for m in CASE_METRICS}} for r in counts]
    measured = [{"row": f"this run ({spec.name}, UNO-style, mean over candidates)", "source": "measured here",
                 "dino": overall.get("uno_dino"), "clip_i": overall.get("uno_clip_i"), "clip_t": overall.get("clip_t")}]
    if curve:
        best = [p for p in curve if p["selector"] == "clip_t"][-1]
        measured.append({"row": f"this run (Pass@{best['n']}, clip_t selector)", "source": "measured here",
                         "dino": best["uno_dino"], "clip_i": best["uno_clip_i"], "clip_t": best["clip_t"]})
    comparison = comparison_rows("msic", measured)
    summary = {
        "benchmark": "multi-subject", "name": spec.name, "cases_file": str(cases_path), "scale": SCALE, "protocol": PROTOCOL,
        "models": models, "grounding": spec.grounding.model_dump(), "cases_in": cases_in,
        "cases_scored": len({r["case_id"] for r in candidates}), "images_scored": len(candidates),
        "dropped": dict(Counter(d["reason"] for d in drops)), "by_subject_count": counts, "passn": curve,
        "comparison": comparison, "output": str(out), **extra,
    }
    lines = [f"# Multi-subject evaluation: {spec.name}", "", f"Scores are **{SCALE}**; the missing rate is a fraction of subjects.", "",
             "- UNO-style: each reference against the whole generated image, mean over subjects (the definition multi-subject "
             "papers report; docs/FIDELITY.md says why it is the headline).",
             "- Grounded: the detector finds each subject's category, boxes are matched one-to-one to subjects, each crop "
             "is scored against its own reference; a subject with no box is missing and scores 0. Worst subject: the lowest grounded DINO.",
             "- A case's score is its mean over its candidates; intervals are 95% bootstrap over cases (stratified by subject count).",
             f"- Models: {', '.join(f'{k}=`{v}`' for k, v in models.items())}",
             f"- Cases: {summary['cases_scored']} scored of {cases_in}; images scored {len(candidates)}.",
             *_tiny_note(models), "", "## Scores by subject count", "", *markdown_table(count_table), "",
             "![by subject count](plots/by_subject_count.png)", "",
             "## The paper's published figures", "", *published_note("msic"),
             *markdown_table(comparison, ["row", "source", "dino", "clip_i", "clip_t"])]
    lines += _passn_outputs(curve, passn_metrics, out, "grounded DINO")
    lines += ["", "## Dropped inputs", "", *markdown_table(drops, ["case_id", "candidate", "reason", "detail"])]
    report = "\n".join(lines) + "\n"
    write_atomic(out / "report.md", lambda tmp: tmp.write_text(report))
    write_json(out / "summary.json", summary)
    return {"summary": summary, "report": report, "tables": {"by_subject_count": count_table, "comparison": comparison,
            "passn": curve, "dropped": drops}}


# --- plots ------------------------------------------------------------------------------------------


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plot_subjects(subject_rows: list[dict], path: Path) -> None:
    plt = _figure()
    rows = [r for r in subject_rows if r["images"]]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 3.4))
    width = 0.27
    for k, metric in enumerate(METRICS):
        ax.bar([i + (k - 1) * width for i in range(len(rows))], [r[metric] for r in rows], width, label=LABELS[metric])
    ax.set_xticks(range(len(rows)), [r["subject"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("raw cosine")
    ax.set_title("DreamBench scores per subject")
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_by_count(counts: list[dict], path: Path) -> None:
    plt = _figure()
    rows = [r for r in counts if r["subjects"] != "all"]
    x = [int(r["subjects"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for metric in ("uno_dino", "uno_clip_i", "clip_t", "grounded_dino", "worst_dino"):
        low = [r[metric] - r[f"{metric}_ci_low"] for r in rows]
        high = [r[f"{metric}_ci_high"] - r[metric] for r in rows]
        left.errorbar(x, [r[metric] for r in rows], yerr=[low, high], marker="o", capsize=3, label=LABELS[metric])
    left.set_xticks(x)
    left.set_xlabel("subjects in the case")
    left.set_ylabel("raw cosine")
    left.legend(fontsize=7)
    right.bar(x, [r["missing_rate"] for r in rows], color="tab:red")
    right.set_xticks(x)
    right.set_xlabel("subjects in the case")
    right.set_ylabel("subject-missing rate")
    right.set_ylim(0, 1)
    fig.suptitle("Scores by subject count (95% bootstrap intervals)")
    _save(plt, fig, path)


def plot_passn(curve: list[dict], metrics: list[str], path: Path) -> None:
    plt = _figure()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.1 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for selector in dict.fromkeys(p["selector"] for p in curve):
            points = [p for p in curve if p["selector"] == selector]
            ax.plot([p["n"] for p in points], [p[metric] for p in points], marker="o", label=selector)
        ax.set_title(LABELS.get(metric, metric), fontsize=9)
        ax.set_xticks(sorted({p["n"] for p in curve}))
        ax.set_xlabel("N")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Pass@N: expected score of the selected candidate")
    _save(plt, fig, path)


# --- Prefect task wrappers --------------------------------------------------------------------------


@task(name="generate-dreambench", task_run_name="generate-shard-{shard:05d}")
def generate_task(spec_json: str, bench_root: str, images_dir: str, subjects: list[str], shard: int) -> dict:
    return generate_dreambench_shard(spec_json, bench_root, images_dir, subjects, shard)


@task(name="score-dreambench", task_run_name="score-dreambench-shard-{shard:05d}")
def score_dreambench_task(spec_json: str, bench_root: str, plan_path: str, subjects: list[str], shard: int,
                          work_dir: str, with_selection: bool) -> dict:
    return score_dreambench_shard(spec_json, bench_root, plan_path, subjects, shard, work_dir, with_selection)


@task(name="score-cases", task_run_name="score-cases-shard-{shard:05d}")
def score_cases_task(spec_json: str, cases_path: str, start: int, stop: int, shard: int, work_dir: str, with_selection: bool) -> dict:
    return score_cases_shard(spec_json, cases_path, start, stop, shard, work_dir, with_selection)
