"""Multi-subject (MSIC-style) evaluation: score a range of a cases table (UNO-style, CLIP-T,
grounded and selector scores), then write the outputs (per-candidate and per-subject scores,
scores by subject count, Pass@N, the report with its plot)."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from data_specs.eval import (CANDIDATE_SCORES, CASE_DROPS, CASE_METRICS, CLIP_T, GROUNDED_DINO, MISSING_RATE, SUBJECT_SCORES, UNO_CLIP_I,
                             UNO_DINO, WORST_DINO, EvalSpec)
from music_model.roles import load_role
from music_model.scoring.metrics import PROTOCOL, SCALE, Scorer
from music_model.scoring.multisubject import by_subject_count, decode_case, score_cases
from music_model.scoring.passn import passn_curve
from safe_files import write_atomic
from tasks.contract import write_table
from tasks.evaluate.common import (comparison_rows, figure, gather, markdown_table, passn_outputs,
                                   published_note, save_figure, shard_marker, tiny_note, with_ci, write_json)
from tasks.faults import stops_on_fault
from tasks.markers import run_marked, shard_name

# The headline scores: the Pass@N curve shows these.
METRICS = (UNO_DINO, UNO_CLIP_I, CLIP_T, GROUNDED_DINO, MISSING_RATE)


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

    def scored() -> tuple[dict, list[Path]]:
        spec = EvalSpec.model_validate_json(spec_json)
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
        outputs = {work / f"{shard_name(shard)}.{kind}.parquet": (table, schema) for kind, table, schema in
                   (("candidates", candidate_rows, CANDIDATE_SCORES), ("subjects", subject_rows, SUBJECT_SCORES), ("dropped", drops, CASE_DROPS))}
        for path, (table, schema) in outputs.items():
            write_table(table, schema, path)
        return {"shard": shard, "rows_in": len(rows), "cases": len(cases), "scored": len(candidate_rows),
                "dropped": dict(Counter(d["reason"] for d in drops))}, list(outputs)

    return run_marked(shard_marker(work, shard), scored)


def finish_cases(spec: EvalSpec, cases_path: str, work_dir: Path, shards: int, cases_in: int, extra: dict) -> dict:
    """Write every multi-subject output from the shards' scores; returns the summary and the tables."""
    out = spec.out_dir()
    candidates = gather(work_dir, shards, "candidates", CANDIDATE_SCORES)
    subjects = gather(work_dir, shards, "subjects", SUBJECT_SCORES)
    drops = gather(work_dir, shards, "dropped", CASE_DROPS)
    b = spec.bootstrap
    counts = by_subject_count(candidates, b.samples, b.confidence, b.seed) if candidates else []
    with_selection = any(not math.isnan(r["select_clip_t"]) for r in candidates)
    curve = passn_curve(candidates, ("case_id",), [m.name for m in METRICS], "grounded_dino", spec.passn.identity_weight) if with_selection else []
    write_table(candidates, CANDIDATE_SCORES, out / "scores" / "candidates.parquet")
    write_table(subjects, SUBJECT_SCORES, out / "scores" / "subjects.parquet")
    write_table(drops, CASE_DROPS, out / "dropped.parquet")
    if counts:
        pq.write_table(pa.Table.from_pylist(counts), out / "scores" / "by_subject_count.parquet")
        plot_by_count(counts, out / "plots" / "by_subject_count.png")
    models = {name: role.model for name, role in spec.roles.items() if name != "clip_select" or with_selection}
    overall = counts[-1] if counts else {}
    count_table = [{"subjects": r["subjects"], "cases": r["cases"], "images": r["images"],
                    **{m.label: with_ci(r[m.name], r[f"{m.name}_ci_low"], r[f"{m.name}_ci_high"]) for m in CASE_METRICS}} for r in counts]
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
             *tiny_note(models), "", "## Scores by subject count", "", *markdown_table(count_table), "",
             "![by subject count](plots/by_subject_count.png)", "",
             "## The paper's published figures", "", *published_note("msic"),
             *markdown_table(comparison, ["row", "source", "dino", "clip_i", "clip_t"])]
    lines += passn_outputs(curve, METRICS, out, "grounded DINO")
    lines += ["", "## Dropped inputs", "", *markdown_table(drops, ["case_id", "candidate", "reason", "detail"])]
    report = "\n".join(lines) + "\n"
    write_atomic(out / "report.md", lambda tmp: tmp.write_text(report))
    write_json(out / "summary.json", summary)
    return {"summary": summary, "report": report, "tables": {"by_subject_count": count_table, "comparison": comparison,
            "passn": curve, "dropped": drops}}


def plot_by_count(counts: list[dict], path: Path) -> None:
    plt = figure()
    rows = [r for r in counts if r["subjects"] != "all"]
    x = [int(r["subjects"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for metric in (UNO_DINO, UNO_CLIP_I, CLIP_T, GROUNDED_DINO, WORST_DINO):
        m = metric.name
        low = [r[m] - r[f"{m}_ci_low"] for r in rows]
        high = [r[f"{m}_ci_high"] - r[m] for r in rows]
        left.errorbar(x, [r[m] for r in rows], yerr=[low, high], marker="o", capsize=3, label=metric.label)
    left.set_xticks(x)
    left.set_xlabel("subjects in the case")
    left.set_ylabel("raw cosine")
    left.legend(fontsize=7)
    right.bar(x, [r[MISSING_RATE.name] for r in rows], color="tab:red")
    right.set_xticks(x)
    right.set_xlabel("subjects in the case")
    right.set_ylabel("subject-missing rate")
    right.set_ylim(0, 1)
    fig.suptitle("Scores by subject count (95% bootstrap intervals)")
    save_figure(plt, fig, path)



@task(name="score-cases", task_run_name="score-cases-shard-{shard:05d}")
@stops_on_fault
def score_cases_task(spec_json: str, cases_path: str, start: int, stop: int, shard: int, work_dir: str, with_selection: bool) -> dict:
    return score_cases_shard(spec_json, cases_path, start, stop, shard, work_dir, with_selection)
