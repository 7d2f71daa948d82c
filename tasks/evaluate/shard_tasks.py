"""The benchmarks' Prefect tasks: each runs one shard hook of the benchmark it names, looked up in
the registry, so a benchmark brings plain functions only. Run names carry the benchmark and shard."""
from __future__ import annotations

from prefect import task

from tasks.engine.faults import stops_on_fault
from tasks.evaluate.registry import benchmark


@task(name="score-benchmark", task_run_name="score-{name}-shard-{shard:05d}")
@stops_on_fault
def score_task(spec_json: str, name: str, arguments: dict, shard: int, work_dir: str) -> dict:
    return benchmark(name).score_shard(spec_json, shard, work_dir, **arguments)


@task(name="fill-benchmark", task_run_name="generate-{name}-shard-{shard:05d}")
@stops_on_fault
def fill_task(spec_json: str, name: str, arguments: dict, shard: int) -> dict:
    return benchmark(name).fill_shard(spec_json, shard, **arguments)


@task(name="generate-music", task_run_name="generate-{name}-shard-{shard:05d}")
@stops_on_fault
def generate_task(spec_json: str, name: str, adapters: str | None, arguments: dict, shard: int, out_dir: str) -> dict:
    return benchmark(name).generation.generate_shard(spec_json, adapters, shard, out_dir, **arguments)
