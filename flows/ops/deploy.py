"""Register the deployments of prefect.yaml and start process workers for them, the way Prefect
users do it (`prefect deploy`, `prefect worker start`), against the server `ensure_server()` chose.
Call `ensure_server()` before anything here: it points Prefect at the server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from flows.runners import check_runner, project_root
from music_model import settings


def prefect_yaml(root: Path | None = None) -> Path:
    path = (root or project_root()) / "prefect.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: deployments are declared in the project's prefect.yaml")
    return path


def declared_pools(root: Path | None = None) -> list[str]:
    config = yaml.safe_load(prefect_yaml(root).read_text())
    return sorted({d["work_pool"]["name"] for d in config.get("deployments", [])})


def ensure_process_pool(name: str) -> bool:
    """Create a process work pool with Prefect's default job template; True when it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            return True
        if pool.type != "process":
            raise ValueError(f"work pool {name!r} exists with type {pool.type!r}; MUSIC deployments need a process pool")
        return False


def register(root: Path | None = None) -> subprocess.CompletedProcess:
    """`prefect --no-prompt deploy --all` in the project folder; the pull step records it as $PWD."""
    root = root or project_root()
    prefect_yaml(root)
    for pool in declared_pools(root):
        ensure_process_pool(pool)
    env = {**os.environ, "PWD": str(root)}
    return subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=root, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


def deployments() -> list[dict]:
    """Every deployment on the server with its pool, schedules and next scheduled run."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    rows = []
    with get_client(sync_client=True) as client:
        for deployment in client.read_deployments():
            flow = client.read_flow(deployment.flow_id)
            upcoming = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1)
            rows.append({
                "name": f"{flow.name}/{deployment.name}", "pool": deployment.work_pool_name,
                "schedules": [getattr(s.schedule, "cron", str(s.schedule)) for s in deployment.schedules if s.active],
                "next_run": upcoming[0].expected_start_time.isoformat() if upcoming else None,
                "parameters": deployment.parameters,
            })
    return sorted(rows, key=lambda row: row["name"])


def worker_name(pool: str, gpu: str | None) -> str:
    return f"{pool}-{socket.gethostname()}" + (f"-gpu{gpu.replace(',', '-')}" if gpu is not None else "")


def worker_process(pool: str, gpu: str | None = None, runner: str = "local", ray_address: str | None = None,
                   name: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The `prefect worker start` command line and environment of a process worker pinned to
    `gpu` (CUDA_VISIBLE_DEVICES, inherited by the flow runs it starts)."""
    check_runner(runner, ray_address)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    env[settings.RUNNER.name] = runner
    env.pop(settings.RAY_ADDRESS.name, None)
    if ray_address:
        env[settings.RAY_ADDRESS.name] = ray_address
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
               "--name", name or worker_name(pool, gpu)]
    return command, env
