"""The Prefect task wrappers of the stages (`tasks.stages`) (one task run per stage and
shard; results are small dicts, never images).

Where a shard's models run:
- in the flow's process (the local runner): a stage with roles holds a device slot of this
  machine while it runs (`music_model.roles.slots`), and its roles load on that slot's device;
- on a Ray cluster: the task hands the shard to one of the run's `ShardWorker` actors, which keep a
  stage's models for every shard of it they serve (loads = actors x model stages, not shards) and
  are restarted, with the shard retried, when their process dies.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, runtime, task

from data_specs.build import BuildSpec
from music_model.roles import release_roles
from music_model.roles.slots import Slot, device_slot, machine_slots
from tasks.engine.build_paths import build_dir
from tasks.engine.contract import run_shard
from tasks.engine.faults import operational_exit
from tasks.engine.image_store import DamagedImage
from tasks.publishing import publish
from tasks.stages import STAGES, spec_from_json, stage_named

# Stages that run models take a device slot (locally) or run on actors (Ray); decimate runs none.
MODEL_STAGES = {stage.name for stage in STAGES if stage.roles}
RAY_NAMESPACE = "music"


@dataclass(frozen=True)
class Placement:
    """Where a stage's shards run: this machine's device slots (`cpu_slots` of them on a machine
    without GPUs), or, when `actors` names the run's Ray actors, actor k mod n for shard k."""
    cpu_slots: int = 0
    actors: tuple[str, ...] = ()


@functools.cache
def _machine_slots(cpu_slots: int) -> list[Slot]:
    return machine_slots(cpu_slots)


def enter_stage(spec: BuildSpec, stage_name: str) -> None:
    """Free every model this stage does not use. A stage without models frees nothing: the next
    model stage may share them (layout and filter both use clip, decimate runs between them)."""
    if stage_name in MODEL_STAGES:
        release_roles(keep=[spec.roles[name] for name in stage_named(stage_name).roles])


def run_stage_shard(stage_name: str, spec_json: str, shard: int, fingerprint: str, upstream_dir: str | None) -> dict:
    """One shard in this process, with only its stage's models resident (a Ray actor or worker
    process that served an earlier stage frees that stage's models first)."""
    spec = spec_from_json(spec_json)
    enter_stage(spec, stage_name)
    with operational_exit(build_dir(spec)):
        return run_shard(stage_named(stage_name), spec, shard, fingerprint, Path(upstream_dir) if upstream_dir else None)


class ShardWorker:
    """A Ray actor that runs one stage's shards and keeps that stage's models between them."""

    def run(self, stage_name: str, spec_json: str, shard: int, fingerprint: str, upstream_dir: str | None) -> dict:
        return run_stage_shard(stage_name, spec_json, shard, fingerprint, upstream_dir)


@task(name="stage-shard", task_run_name="{stage_name}-shard-{shard:05d}")
def stage_shard(stage_name: str, spec_json: str, shard: int, fingerprint: str, upstream_dir: str | None,
                placement: Placement = Placement()) -> dict:
    args = (stage_name, spec_json, shard, fingerprint, upstream_dir)
    if placement.actors:
        import ray

        actor = ray.get_actor(placement.actors[shard % len(placement.actors)], namespace=RAY_NAMESPACE)
        return ray.get(actor.run.remote(*args))
    if stage_name not in MODEL_STAGES:
        return run_stage_shard(*args)
    holder = {"what": f"{stage_name}-shard-{shard:05d}", "flow_run": f"{runtime.flow_run.name} ({runtime.flow_run.id})"}
    with device_slot(_machine_slots(placement.cpu_slots), holder, log=get_run_logger().warning):
        return run_stage_shard(*args)


@task(name="publish", task_run_name="publish-{fingerprint}")
def publish_dataset(spec_json: str, filter_dir: str, shards: int, summaries: list[dict], fingerprint: str,
                    waves: list[int] | None = None) -> dict:
    """The published stats, or `{"damaged": <image>}` when a stored image it embeds is damaged (the
    flow forgets it, redoes the shards that made it and publishes again)."""
    spec = spec_from_json(spec_json)
    with operational_exit(build_dir(spec)):
        try:
            return publish.publish(spec, Path(filter_dir), shards, summaries, fingerprint, waves)
        except DamagedImage as error:
            return {"damaged": error.relative}
