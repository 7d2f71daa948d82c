"""Where a flow's shard tasks run.

- `local` (the default): a bounded thread pool in the flow's process; GPU stages also hold a slot
  of a Prefect global concurrency limit named after this host and its visible GPUs, so flows that
  share a machine never put more models on its GPUs than it has GPUs.
- `ray`: prefect-ray's RayTaskRunner on an existing cluster, named by its GCS address
  (`127.0.0.1:6379`). GPU stages ask Ray for GPUs; CPU stages don't. prefect-ray treats "auto" as
  "start a new local Ray", and `ray://` clients break with Ray's token auth, so both are refused.

Deployment runs pick the runner from `MUSIC_RUNNER` / `MUSIC_RAY_ADDRESS` (set them as job
variables); the CLI passes `--runner` / `--ray-address`. Prefect is imported lazily: the CLI checks
the choice before it starts the server, and Prefect must be imported after that."""
from __future__ import annotations

import os
import re
import socket
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

RUNNERS = ("local", "ray")
LOCAL_WORKERS = 2
# Environment the Ray workers need to find the zoo, the Prefect server and relative output roots.
FORWARDED_ENV_PREFIXES = ("MUSIC_", "PREFECT_", "HF_", "TRANSFORMERS_")
DRIVER_DIR_ENV = "MUSIC_DRIVER_DIR"


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


def make_task_runner(runner: str = "local", ray_address: str | None = None, max_workers: int = LOCAL_WORKERS) -> TaskRunner:
    check_runner(runner, ray_address)
    if runner == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers)
    try:
        from prefect_ray.task_runners import RayTaskRunner
    except ImportError as error:
        raise RunnerError("--runner ray needs the ray extra: pip install 'music-pipeline[ray]'") from error
    # Without it Ray swaps 127.0.0.1 for the machine's address and the driver cannot reach the GCS.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    env[DRIVER_DIR_ENV] = os.getcwd()
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
    return make_task_runner(os.environ.get("MUSIC_RUNNER", "local"), os.environ.get("MUSIC_RAY_ADDRESS") or None)


def enter_driver_directory() -> None:
    """Ray worker set-up: relative output roots resolve as in the flow's process. A multi-node
    cluster needs the project and the output root at the same paths on every node."""
    os.chdir(os.environ[DRIVER_DIR_ENV])


def _is_ray(runner: TaskRunner) -> bool:
    ray_runners = sys.modules.get("prefect_ray.task_runners")
    return ray_runners is not None and isinstance(runner, ray_runners.RayTaskRunner)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_limit_name() -> str:
    """One limit per machine and set of visible GPUs: one worker per GPU gets a limit per GPU."""
    devices = os.environ.get("CUDA_VISIBLE_DEVICES", "all") or "none"
    return re.sub(r"[^a-z0-9-]+", "-", f"gpu-slots-{socket.gethostname()}-{devices}".lower()).strip("-")


@dataclass(frozen=True)
class ShardPlacement:
    """How a flow run places its stages' shard tasks: on the local pool GPU stages take a slot of
    `gpu_limit`; on Ray they ask for `ray_gpus` GPUs each."""
    runner: str
    gpu_limit: str | None = None
    gpu_slots: int = 0
    ray_gpus: float = 0.0

    @classmethod
    def for_this_run(cls) -> "ShardPlacement":
        """For the running flow's task runner; call inside a flow (the runner has started)."""
        from prefect import get_run_logger
        from prefect.context import FlowRunContext

        runner = FlowRunContext.get().task_runner
        if _is_ray(runner):
            import ray

            cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
            wanted = float(os.environ.get("MUSIC_RAY_GPUS_PER_SHARD", "1"))
            if not cluster_gpus:
                get_run_logger().warning("the Ray cluster has no GPUs: GPU stages run on its CPUs")
            return cls("ray", ray_gpus=min(wanted, cluster_gpus))
        # Without GPUs the pool's bound is the only limit; the slots then keep the same code path.
        slots = visible_gpus() or getattr(runner, "_max_workers", None) or LOCAL_WORKERS
        name = gpu_limit_name()
        ensure_concurrency_limit(name, slots)
        return cls("local", gpu_limit=name, gpu_slots=slots)

    def task_limit(self, gpu_stage: bool) -> str | None:
        """The concurrency limit a stage's task holds a slot of while it runs."""
        return self.gpu_limit if gpu_stage else None

    def submitting(self, gpu_stage: bool) -> AbstractContextManager:
        """Wrap a stage's `map` in it: on Ray, GPU stages' tasks ask for GPUs."""
        if self.runner == "ray" and gpu_stage and self.ray_gpus:
            from prefect_ray.context import remote_options

            return remote_options(num_gpus=self.ray_gpus)
        return nullcontext()


def ensure_concurrency_limit(name: str, slots: int) -> None:
    """Create the global concurrency limit, or set its size (tasks acquire it with strict=True)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, slots)


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent
