"""`evaluate`: optional generation -> scoring, one task run per shard -> aggregation -> outputs
(scores Parquet, summary.json, report.md with plots) and Prefect artifacts (tables, the report).

Everything that would make a run fail part-way is checked first, before any task is submitted: the
spec, the benchmark folder and its photos, the generated-images folder or the cases table."""
from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from data_specs.eval import EvalSpec, load_eval_spec
from flows.ops.monitor import on_flow_running
from flows.run_names import artifact_key, run_name
from music_model.roles import total_model_loads
from tasks.engine.faults import stops_on_fault
from tasks.engine.markers import check_marker, shard_marker
from tasks.evaluate import registry
from tasks.evaluate.common import fingerprint, json_safe, write_json
from tasks.evaluate.shard_tasks import fill_task, score_task

MAX_ARTIFACT_ROWS = 500


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


@flow(name="evaluate", flow_run_name=run_name("evaluate", "benchmark"), log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2),
      on_running=[on_flow_running])
@stops_on_fault  # outside the task runs too: writing the report on a full disk is one line
def evaluate(spec_json: str, benchmark: str, images: str | None = None, cases: str | None = None, bench_root: str | None = None) -> dict:
    """Score a registered benchmark (tasks/evaluate/registry.py): DreamBench from a folder of
    generated images (optionally generated first by the spec's generator, from `bench_root`'s
    photos), MSIC (or any multi-subject cases table) from `cases`; returns the summary (paths,
    scores, counts)."""
    bench = registry.benchmark(benchmark)
    logger = get_run_logger()
    started, loads = time.perf_counter(), total_model_loads()
    spec = EvalSpec.model_validate_json(spec_json)
    spec_json = spec.model_dump_json()
    filled: list[dict] = []

    def fill(shards: list[dict]) -> list[dict]:
        filled.extend(shards)
        futures = fill_task.map(unmapped(spec_json), unmapped(bench.name), shards, list(range(len(shards))))
        return [f.result() for f in futures]

    prepared = bench.prepare(spec, {"images": images, "cases": cases, "bench_root": bench_root}, fill, logger)
    work = spec.out_dir() / "shards" / fingerprint(spec, bench.fingerprint_key, prepared.inputs)
    results, todo = _done_and_todo(work, len(prepared.shards), logger)
    futures = score_task.map(unmapped(spec_json), unmapped(bench.name), [prepared.shards[k] for k in todo], todo,
                             unmapped(str(work))) if todo else []
    results = sorted(results + [f.result() for f in futures], key=lambda r: r["shard"])
    result = bench.finish(spec, prepared, work, {"shards": results})
    publish_artifacts(spec.name, result)
    summary = {**result["summary"], "task_runs": len(filled) + len(todo), "model_loads": total_model_loads() - loads,
               "wall_seconds": round(time.perf_counter() - started, 2)}
    write_json(Path(summary["output"]) / "summary.json", summary)
    logger.info("wrote %s (report.md, summary.json, scores/)", summary["output"])
    return json_safe(summary)


@flow(name="evaluate-from-file", flow_run_name=run_name("evaluate", "benchmark"), on_running=[on_flow_running])
def evaluate_from_file(spec_path: str, benchmark: str, images: str | None = None, cases: str | None = None,
                       bench_root: str | None = None) -> dict:
    """`evaluate` from a spec file: the deployment entry point."""
    return evaluate(load_eval_spec(spec_path).model_dump_json(), benchmark, images, cases, bench_root)

