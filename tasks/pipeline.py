"""The training-set stages in order, and their Prefect task wrappers (one task run per stage and
shard; results are small dicts, never images)."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from prefect import task
from prefect.concurrency.sync import concurrency

from data_specs.build import BuildSpec
from tasks import annotate, compose, decimate, detect, filter, layout, publish, rerender, synthesize, verify
from tasks.engine import Stage, run_shard

STAGES: list[Stage] = [
    compose.STAGE, synthesize.STAGE, detect.STAGE, verify.STAGE, rerender.STAGE,
    annotate.STAGE, layout.STAGE, decimate.STAGE, filter.STAGE,
]
BY_NAME = {stage.name: stage for stage in STAGES}
GPU_STAGES = {"compose", "synthesize", "detect", "verify", "rerender", "annotate", "layout", "filter"}
# A killed process's GPU slots come back when their lease runs out (the default 300 s would stall
# the next run that long); a late renewal must not fail a long shard, so it does not raise.
GPU_SLOT_LEASE_SECONDS = 60


@task(name="stage-shard", task_run_name="{stage_name}-shard-{shard:05d}")
def stage_shard(stage_name: str, spec_json: str, shard: int, fingerprint: str, upstream_dir: str | None,
                gpu_limit: str | None = None) -> dict:
    """`gpu_limit`: a global concurrency limit to hold a slot of while the shard runs (GPU stages on
    the local runner; the flow creates the limit, strict so a missing one fails loudly)."""
    spec = BuildSpec.model_validate_json(spec_json)
    upstream = Path(upstream_dir) if upstream_dir else None
    slot = concurrency(gpu_limit, occupy=1, strict=True, lease_duration=GPU_SLOT_LEASE_SECONDS,
                       raise_on_lease_renewal_failure=False) if gpu_limit else nullcontext()
    with slot:
        return run_shard(BY_NAME[stage_name], spec, shard, fingerprint, upstream)


@task(name="publish", task_run_name="publish-{fingerprint}")
def publish_dataset(spec_json: str, filter_dir: str, shards: int, summaries: list[dict], fingerprint: str) -> dict:
    spec = BuildSpec.model_validate_json(spec_json)
    return publish.publish(spec, Path(filter_dir), shards, summaries, fingerprint)
