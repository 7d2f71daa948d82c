"""`evaluate`: optional generation -> scoring, one task run per shard -> aggregation -> outputs
(scores Parquet, summary.json, report.md with plots) and Prefect artifacts (tables, the report).

Everything that would make a run fail part-way is checked first, before any task is submitted: the
spec, the benchmark folder and its photos, the generated-images folder or the cases table."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from data_specs.eval import EvalSpec, load_eval_spec
from flows.ops.monitor import on_flow_running
from flows.run_names import artifact_key, run_name
from music_model.roles import total_model_loads
from music_model.scoring.dreambench import DreamBenchError, load_dreambench, scan_generated
from music_model.scoring.multisubject import CasesError, read_cases_table
from tasks.evaluate.cases import finish_cases, score_cases_task
from tasks.faults import stops_on_fault
from tasks.evaluate.common import chunks, files_digest, fingerprint, json_safe, shard_marker, write_json
from tasks.evaluate.dreambench import finish_dreambench, generate_task, score_dreambench_task, write_plan
from tasks.markers import check_marker

MAX_ARTIFACT_ROWS = 500
BENCHMARKS = ("dreambench", "cases")


def _clean(rows: list[dict]) -> list[dict]:
    """Table-artifact rows: JSON has no NaN, and lists (boxes) are not table cells."""
    return [{k: v for k, v in json_safe(row).items() if not isinstance(v, (list, dict))} for row in rows[:MAX_ARTIFACT_ROWS]]


def publish_artifacts(name: str, result: dict) -> None:
    for table, rows in result["tables"].items():
        if rows:
            more = f" (first {MAX_ARTIFACT_ROWS} of {len(rows)})" if len(rows) > MAX_ARTIFACT_ROWS else ""
            create_table_artifact(_clean(rows), key=artifact_key("eval", name, table), description=f"{name}: {table}{more}")
    create_markdown_artifact(result["report"], key=artifact_key("eval", name, "report"), description=f"evaluation report of {name}")


def _done_and_todo(work: Path, shards: int, logger) -> tuple[list[dict], list[int]]:
    """Markers of the shards already scored with these inputs whose outputs prove themselves, and
    the shards still to do: a rerun submits task runs only for work."""
    done = []
    for k in range(shards):
        marker, problem = check_marker(shard_marker(work, k))
        if problem:
            logger.warning(problem)
        if marker:
            done.append(marker)
    finished = {marker["shard"] for marker in done}
    return done, [k for k in range(shards) if k not in finished]


def _dreambench(spec: EvalSpec, images: str | None, bench_root: str | None, logger) -> tuple[dict, int]:
    root = bench_root or spec.dreambench_root
    if not root:
        raise DreamBenchError("no DreamBench folder: pass bench_root (--bench) or set dreambench_root in the spec")
    bench = load_dreambench(root)
    out = spec.out_dir()
    images_dir = Path(images).expanduser().resolve() if images else out / "generated"
    spec_json, task_runs = spec.model_dump_json(), 0
    if spec.generator is not None:
        subjects = spec.generation.subjects or list(bench.subjects)
        unknown = [s for s in subjects if s not in bench.subjects]
        if unknown:
            raise DreamBenchError(f"generation.subjects: {unknown[0]!r} has no photos in {bench.root}")
        groups = chunks(subjects, spec.shard_size)
        futures = generate_task.map(unmapped(spec_json), unmapped(str(bench.root)), unmapped(str(images_dir)), groups,
                                    list(range(len(groups))))
        made = [f.result() for f in futures]
        task_runs += len(groups)
        logger.info("generated %d images (%d already there) with %s", sum(m["generated"] for m in made),
                    sum(m["existing"] for m in made), spec.generator.model)
    scan = scan_generated(bench, images_dir)
    if scan.drops:
        logger.warning("left out %d files: %s", len(scan.drops), scan.drop_counts())
    plan = out / "plan.parquet"
    write_plan(scan, plan)
    cells = {(i.subject, i.prompt_index) for i in scan.images}
    with_selection = len(cells) < len(scan.images)  # some prompt has several candidates: Pass@N
    references = [p for s in bench.subjects.values() for p in s.references]
    fp = fingerprint(spec, "dreambench", files_digest(references + [i.path for i in scan.images]) + f":{with_selection}")
    work = out / "shards" / fp
    groups = chunks(list(dict.fromkeys(i.subject for i in scan.images)), spec.shard_size)
    results, todo = _done_and_todo(work, len(groups), logger)
    futures = score_dreambench_task.map(unmapped(spec_json), unmapped(str(bench.root)), unmapped(str(plan)), [groups[k] for k in todo],
                                        todo, unmapped(str(work)), unmapped(with_selection)) if todo else []
    results = sorted(results + [f.result() for f in futures], key=lambda r: r["shard"])
    extra = {"images_dir": str(images_dir), "shards": results}
    return finish_dreambench(spec, bench, scan, work, len(groups), extra), task_runs + len(todo)


def _cases(spec: EvalSpec, cases: str, logger) -> tuple[dict, int]:
    if spec.generator is not None:
        raise CasesError("generator: multi-subject generation needs the MUSIC renderer; fill the cases' `generated` column instead")
    table = read_cases_table(cases)
    counts = [len(g) for g in table.column("generated").to_pylist()]
    with_selection = max(counts) > 1
    fp = fingerprint(spec, "cases", hashlib.sha256(Path(cases).read_bytes()).hexdigest() + f":{with_selection}")
    work = spec.out_dir() / "shards" / fp
    ranges = chunks(list(range(len(table))), spec.shard_size)
    results, todo = _done_and_todo(work, len(ranges), logger)
    futures = score_cases_task.map(unmapped(spec.model_dump_json()), unmapped(str(Path(cases).expanduser().resolve())),
                                   [ranges[k][0] for k in todo], [ranges[k][-1] + 1 for k in todo], todo,
                                   unmapped(str(work)), unmapped(with_selection)) if todo else []
    results = sorted(results + [f.result() for f in futures], key=lambda r: r["shard"])
    return finish_cases(spec, cases, work, len(ranges), len(table), {"shards": results}), len(todo)


@flow(name="evaluate", flow_run_name=run_name("evaluate", "benchmark"), log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2),
      on_running=[on_flow_running])
@stops_on_fault  # outside the task runs too: writing the report on a full disk is one line
def evaluate(spec_json: str, benchmark: str, images: str | None = None, cases: str | None = None, bench_root: str | None = None) -> dict:
    """Score DreamBench (a folder of generated images, optionally generated first by the spec's
    generator) or a multi-subject cases table; returns the summary (paths, scores, counts)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {', '.join(BENCHMARKS)}, got {benchmark!r}")
    logger = get_run_logger()
    started, loads = time.perf_counter(), total_model_loads()
    spec = EvalSpec.model_validate_json(spec_json)
    if benchmark == "dreambench":
        result, task_runs = _dreambench(spec, images, bench_root, logger)
    else:
        if not cases:
            raise CasesError("benchmark 'cases' needs a cases Parquet file")
        result, task_runs = _cases(spec, cases, logger)
    publish_artifacts(spec.name, result)
    summary = {**result["summary"], "task_runs": task_runs, "model_loads": total_model_loads() - loads,
               "wall_seconds": round(time.perf_counter() - started, 2)}
    write_json(Path(summary["output"]) / "summary.json", summary)
    logger.info("wrote %s (report.md, summary.json, scores/)", summary["output"])
    return json_safe(summary)


@flow(name="evaluate-from-file", flow_run_name=run_name("evaluate", "benchmark"), on_running=[on_flow_running])
def evaluate_from_file(spec_path: str, benchmark: str, images: str | None = None, cases: str | None = None,
                       bench_root: str | None = None) -> dict:
    """`evaluate` from a spec file: the deployment entry point."""
    return evaluate(load_eval_spec(spec_path).model_dump_json(), benchmark, images, cases, bench_root)

