"""Where a flow's shard tasks run.

- `local` (the default): a bounded thread pool in the flow's process; a shard of a stage that
  runs models holds one of this machine's device slots (one per GPU, see
  `music_model.roles.slots`) and its models load on that GPU, so N GPUs run N shards at once and
  flows that share a machine never put more shards on a GPU than one.
- `ray`: prefect-ray's RayTaskRunner on an existing cluster, named by its GCS address
  (`127.0.0.1:6379`). A model stage runs on actors that ask Ray for GPUs and keep their models
  for the stage; CPU stages run as plain tasks. prefect-ray treats "auto" as "start a new local
  Ray", and `ray://` clients break with Ray's token auth, so both are refused.

Deployment runs pick the runner from `MUSIC_RUNNER` / `MUSIC_RAY_ADDRESS` (set them as job
variables); the CLI passes `--runner` / `--ray-address`. Prefect is imported lazily: the CLI checks
the choice before it starts the server, and Prefect must be imported after that."""
from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from music_model import settings

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

    from tasks.build_tasks import Placement

RUNNERS = ("local", "ray")
LOCAL_WORKERS = 2
RAY_RETRIES = 2
# Environment the Ray workers need to find the zoo, the Prefect server and relative output roots.
FORWARDED_ENV_PREFIXES = ("MUSIC_", "PREFECT_", "HF_", "TRANSFORMERS_")


class RunnerError(ValueError):
    pass


def check_runner(runner: str, ray_address: str | None) -> None:
    if runner not in RUNNERS:
        raise RunnerError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if runner == "local" and ray_address:
        raise RunnerError("--ray-address is only used with --runner ray")
    if runner == "ray" and (not ray_address or ray_address == "auto" or ray_address.startswith("ray://")):
        raise RunnerError(f"--ray-address must be a running cluster's GCS address such as 127.0.0.1:6379, got {ray_address!r} "
                          "('auto' would start a new local Ray; ray:// clients fail with Ray's token auth)")


def local_workers() -> int:
    """One pool thread per visible GPU (each shard holds one GPU's slot), at least `LOCAL_WORKERS`."""
    import torch

    return max(LOCAL_WORKERS, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def make_task_runner(runner: str = "local", ray_address: str | None = None, max_workers: int | None = None) -> TaskRunner:
    check_runner(runner, ray_address)
    if runner == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers or local_workers())
    try:
        from prefect_ray.task_runners import RayTaskRunner
    except ImportError as error:
        raise RunnerError("--runner ray needs the ray extra: pip install 'music-pipeline[ray]'") from error
    # Without it Ray swaps 127.0.0.1 for the machine's address and the driver cannot reach the GCS.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    env[settings.DRIVER_DIR.name] = os.getcwd()
    env["OMP_NUM_THREADS"] = str(intra_op_threads())
    return RayTaskRunner(address=ray_address, init_kwargs={
        "runtime_env": {"env_vars": env, "worker_process_setup_hook": "flows.runners.enter_driver_directory"},
        "logging_level": "WARNING",
    })


def intra_op_threads() -> int:
    """The flow process's torch thread count. Ray would give a 1-CPU task one thread, and CPU float
    sums split over another thread count give other bits: Ray workers use the local pool's count."""
    import torch

    return torch.get_num_threads()


def default_task_runner() -> TaskRunner:
    """The runner named by `MUSIC_RUNNER` (default local) and `MUSIC_RAY_ADDRESS`."""
    return make_task_runner(settings.RUNNER.get(), settings.RAY_ADDRESS.get() or None)


def enter_driver_directory() -> None:
    """Ray worker set-up: relative output roots resolve as in the flow's process. A multi-node
    cluster needs the project and the output root at the same paths on every node."""
    os.chdir(settings.DRIVER_DIR.get())


def _is_ray(runner: TaskRunner) -> bool:
    ray_runners = sys.modules.get("prefect_ray.task_runners")
    return ray_runners is not None and isinstance(runner, ray_runners.RayTaskRunner)


@dataclass
class ShardPlacement:
    """How a flow run places its stages' shards. Local: model stages hold one of this machine's
    device slots per shard (`cpu_slots` of them on a machine without GPUs). Ray: model stages run
    on `ray_actors` actors asking for `ray_gpus` GPUs each, started at the first model stage and
    kept for the run; each keeps a stage's models for all the shards it serves and frees them when
    it moves to the next stage (loads = actors x model stages)."""
    runner: str
    cpu_slots: int = LOCAL_WORKERS
    ray_gpus: float = 0.0
    ray_actors: int = 0
    actors: list = field(default_factory=list)
    actor_names: tuple[str, ...] = ()

    def for_stage(self, stage_name: str, shards: int) -> tuple[Placement, AbstractContextManager]:
        """Where a stage's tasks run, and a context to submit them in."""
        from tasks.build_tasks import MODEL_STAGES, Placement

        if self.runner == "local" or stage_name not in MODEL_STAGES or not shards:
            return Placement(cpu_slots=self.cpu_slots), nullcontext()
        from prefect_ray.context import remote_options

        if not self.actors:
            self._start_actors()
        # The tasks only wait for an actor: they take no CPU the actors need.
        return Placement(actors=self.actor_names), remote_options(num_cpus=0)

    def _start_actors(self) -> None:
        import ray

        from tasks.build_tasks import RAY_NAMESPACE, ShardWorker

        # A worker process that dies (killed, OOM) is restarted and its shard retried; the shard is
        # written atomically and marked last, so a retry makes the same bytes. The actors reserve no
        # CPU: they live for the run, and the CPU stages' tasks between model stages need the CPUs.
        worker = ray.remote(num_cpus=0, num_gpus=self.ray_gpus, max_restarts=RAY_RETRIES, max_task_retries=RAY_RETRIES)(ShardWorker)
        self.actor_names = tuple(f"music-shard-worker-{uuid.uuid4().hex[:12]}-{i}" for i in range(self.ray_actors))
        self.actors = [worker.options(name=name, namespace=RAY_NAMESPACE).remote() for name in self.actor_names]

    def close(self) -> None:
        """Stop the run's actors (their models go with them)."""
        if self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor)
            self.actors = []


@contextmanager
def shard_placement() -> Iterator[ShardPlacement]:
    """The placement for the running flow's task runner; call inside a flow (the runner has started)."""
    from prefect import get_run_logger
    from prefect.context import FlowRunContext

    runner = FlowRunContext.get().task_runner
    if not _is_ray(runner):
        yield ShardPlacement("local", cpu_slots=getattr(runner, "_max_workers", None) or LOCAL_WORKERS)
        return
    import ray

    resources = ray.cluster_resources()
    cluster_gpus = resources.get("GPU", 0.0)
    wanted = settings.RAY_GPUS_PER_SHARD.number()
    if cluster_gpus:
        gpus = min(wanted, cluster_gpus)
        placement = ShardPlacement("ray", ray_gpus=gpus, ray_actors=max(1, int(cluster_gpus // gpus)))
    else:
        get_run_logger().warning("the Ray cluster has no GPUs: model stages run on its CPUs")
        placement = ShardPlacement("ray", ray_actors=max(1, int(resources.get("CPU", 1))))
    try:
        yield placement
    finally:
        placement.close()


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent
