"""MSIC, and any multi-subject cases table: score a range of a cases table (UNO-style, CLIP-T,
grounded and selector scores), then write the outputs (per-candidate and per-subject scores, scores
by subject count, Pass@N, the report with its plot); and the MUSIC model's generation on MSIC.
`BENCHMARK` holds it all for the registry."""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_specs.eval import CANDIDATE_SCORES, CASE_DROPS, CASE_METRICS, CASES, CLIP_T, GROUNDED_DINO, MISSING_RATE, SUBJECT_SCORES, UNO_CLIP_I, UNO_DINO, WORST_DINO, EvalSpec, load_eval_spec
from data_specs.roles import SpecError
from data_specs.train import TrainSpec, resolve_spec_path
from music_model.music.model import GENERATION, generate_msic_shard, load_model, msic_cases_file, read_msic_cases
from music_model.roles import load_role
from music_model.scoring.metrics import PROTOCOL, SCALE, Scorer
from music_model.scoring.multisubject import CasesError, by_subject_count, decode_case, read_cases_table, score_cases
from music_model.scoring.passn import passn_curve
from safe_files import write_atomic
from tasks.engine.contract import write_table
from tasks.engine.markers import run_marked, shard_marker, shard_name
from tasks.evaluate.benchmark import Benchmark, Generation, Prepared, ShardRunner
from tasks.evaluate.common import chunks, comparison_rows, figure, files_digest, gather, markdown_table, passn_outputs, published_note, save_figure, tiny_note, with_ci, write_json

# The headline scores: the Pass@N curve, the pipeline report and `music eval msic` show these.
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


def score_cases_shard(spec_json: str, shard: int, work_dir: str, cases_path: str, start: int, stop: int, with_selection: bool) -> dict:
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


def prepare_cases(spec: EvalSpec, inputs: dict, fill: ShardRunner, logger) -> Prepared:
    """The cases table checked, `shard_size` cases a shard. Its candidates are its `generated` column:
    nothing is filled."""
    if spec.generator is not None:
        raise CasesError("generator: multi-subject generation needs the MUSIC renderer; fill the cases' `generated` column instead")
    cases = inputs.get("cases")
    if not cases:
        raise CasesError(f"benchmark {BENCHMARK.name!r} needs a cases Parquet file")
    table = read_cases_table(cases)
    with_selection = max(len(g) for g in table.column("generated").to_pylist()) > 1
    path = str(Path(cases).expanduser().resolve())
    ranges = chunks(list(range(len(table))), spec.shard_size)
    return Prepared(hashlib.sha256(Path(cases).read_bytes()).hexdigest() + f":{with_selection}",
                    [{"cases_path": path, "start": r[0], "stop": r[-1] + 1, "with_selection": with_selection} for r in ranges],
                    (cases, len(table)))


def finish_cases(spec: EvalSpec, prepared: Prepared, work_dir: Path, extra: dict) -> dict:
    """Write every multi-subject output from the shards' scores; returns the summary and the tables."""
    cases_path, cases_in = prepared.state
    shards = len(prepared.shards)
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
    comparison = comparison_rows(BENCHMARK.name, measured)
    summary = {
        "benchmark": BENCHMARK.name, "name": spec.name, "cases_file": str(cases_path), "scale": SCALE, "protocol": PROTOCOL,
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
             "## The paper's published figures", "",
             *published_note("neither the model nor the benchmark is the same: this MSIC is a regeneration by the paper's recipe "
                             "(the paper's curated set was never released)"),
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



# --- the MUSIC model's generation ----------------------------------------------------------------
# Into `<run>/generated/msic-<fingerprint>/`: images/<case_id>/<k>.png, and per shard
# parts/part-00003.{cases,generation}.parquet then its marker; merged into cases.parquet (the scoring
# code's cases table, data_specs.eval.CASES) and generation.parquet (seeds, planner output, plan,
# repairs per candidate).


def check_generation(spec: TrainSpec) -> None:
    """The training spec names an MSIC benchmark whose cases file exists."""
    if not spec.evaluation.msic:
        raise SpecError("evaluation.msic: no MSIC benchmark (pass --msic)")
    msic_cases_file(spec.evaluation.msic)


def plan_generation(spec: TrainSpec, logger) -> Prepared:
    """The MSIC cases file, `shard_size` cases a shard."""
    check_generation(spec)
    cases = msic_cases_file(spec.evaluation.msic)
    ranges = chunks(list(range(pq.ParquetFile(cases).metadata.num_rows)), spec.generation.shard_size)
    return Prepared(files_digest([cases.resolve()]), [{"cases_path": str(cases), "start": r[0], "stop": r[-1] + 1} for r in ranges])


def pass_selector(spec: TrainSpec):
    """The Pass@N selector (the eval spec's `clip_select`) when the strategy prunes, else None."""
    if spec.generation.strategy not in ("prune", "screen_prune"):
        return None
    return Scorer(None, None, load_role(load_eval_spec(resolve_spec_path(spec.evaluation.eval_spec)).roles["clip_select"])).selection_scores


def generate_msic_part(spec_json: str, adapters: str | None, shard: int, out_dir: str, cases_path: str, start: int, stop: int) -> dict:
    """Candidates for MSIC cases [start, stop): images, the cases-table rows and the seeds, then a marker."""
    out = Path(out_dir)

    def generated() -> tuple[dict, list[Path]]:
        spec = TrainSpec.model_validate_json(spec_json)
        rows, records = generate_msic_shard(load_model(spec, adapters), read_msic_cases(cases_path, start, stop), out,
                                            spec.generation.candidates, spec.generation.seed, spec.generation, pass_selector(spec))
        outputs = [out / "parts" / f"{shard_name(shard)}.cases.parquet", out / "parts" / f"{shard_name(shard)}.generation.parquet"]
        write_table(rows, CASES, outputs[0])
        write_table(records, GENERATION, outputs[1])
        return {"shard": shard, "cases": len(rows), "images": len(records), "plans_repaired": sum(bool(r["repairs"]) for r in records),
                "plans_rejected": sum(r["plan_error"] is not None for r in records)}, outputs

    return run_marked(shard_marker(out / "parts", shard), generated)


def merge_msic_parts(out: Path, plan: Prepared) -> tuple[dict, dict]:
    """The shards' tables as one cases table (its image paths relative to it) and one generation table."""
    merged = {}
    for kind, schema in (("cases", CASES), ("generation", GENERATION)):
        tables = [pq.read_table(out / "parts" / f"{shard_name(k)}.{kind}.parquet", schema=schema) for k in range(len(plan.shards))]
        path = out / f"{kind}.parquet"
        table = pa.concat_tables(tables)
        write_atomic(path, lambda tmp, t=table: pq.write_table(t, tmp, compression="zstd"))
        merged[kind] = str(path)
    return {"cases_file": merged["cases"], "generation_file": merged["generation"]}, {"cases": merged["cases"]}


BENCHMARK = Benchmark(
    name="msic", metrics=METRICS, prepare=prepare_cases, score_shard=score_cases_shard, finish=finish_cases,
    generation=Generation(wanted=lambda spec: bool(spec.evaluation.msic), plan=plan_generation, generate_shard=generate_msic_part,
                          finish=merge_msic_parts, check=check_generation),
    # Evaluations made when this benchmark was called "cases" hashed that name: keeping it keeps their shards' fingerprints valid.
    fingerprint_name="cases",
)
