"""Flow runs left RUNNING by a process that died (kill -9, OOM, a lost machine) are marked CRASHED
at the next run of the same flow.

A killed process cannot report its own end, and Prefect leaves its run RUNNING for ever. So each
run records its process in its labels (host, pid, the pid's start time) and beats a heartbeat
label; the next run of that flow crashes every other RUNNING run whose process is gone (same
host: the pid with that start time no longer exists) or whose heartbeat stopped (another host).
Runs without these labels are not judged. Attach `on_flow_running` as a flow's on_running hook."""
from __future__ import annotations

import os
import socket
import threading
import time
from uuid import UUID

import psutil

HOST, PID, PID_STARTED, HEARTBEAT = "music.host", "music.pid", "music.pid_started", "music.heartbeat"
HEARTBEAT_SECONDS = float(os.environ.get("MUSIC_HEARTBEAT_SECONDS", "30"))
# A run on another host is stale after this many missed beats.
STALE_BEATS = 4


def this_process() -> dict[str, str]:
    process = psutil.Process()
    return {HOST: socket.gethostname(), PID: str(process.pid), PID_STARTED: f"{process.create_time():.2f}"}


def process_alive(pid: int, started: float) -> bool:
    """The pid exists and is the same process (not a reuse of the number)."""
    try:
        return abs(psutil.Process(pid).create_time() - started) < 0.05
    except psutil.NoSuchProcess:
        return False


def why_stale(labels: dict, now: float) -> str | None:
    """Why a RUNNING run's process is gone, or None when it may be alive (or is not ours to judge)."""
    if not {HOST, PID, PID_STARTED} <= labels.keys():
        return None
    host, pid = labels[HOST], int(labels[PID])
    if host == socket.gethostname():
        if process_alive(pid, float(labels[PID_STARTED])):
            return None
        return f"its process {pid} on {host} no longer exists"
    silent = now - float(labels.get(HEARTBEAT, labels[PID_STARTED]))
    if silent > STALE_BEATS * HEARTBEAT_SECONDS:
        return f"no heartbeat from its process {pid} on {host} for {silent:.0f} s"
    return None


def crash_stale_runs(flow_id: UUID, current_run: UUID | None = None) -> list[tuple[UUID, str, str]]:
    """Mark the flow's RUNNING runs whose process is gone CRASHED, with their RUNNING task runs;
    returns (id, name, reason) of each."""
    from prefect import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterId, FlowRunFilter, FlowRunFilterId, FlowRunFilterState,
                                                FlowRunFilterStateType, TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Crashed

    crashed = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(id=FlowFilterId(any_=[flow_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
        )
        now = time.time()
        for run in runs:
            if run.id == current_run or not (reason := why_stale(dict(run.labels or {}), now)):
                continue
            message = f"Crashed: found RUNNING by a later run of this flow, but {reason}"
            # Orchestrated first, so the transition releases what the run held; forced if refused.
            if client.set_flow_run_state(run.id, Crashed(message=message)).status != SetStateStatus.ACCEPT:
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            for task_run in client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                    task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING])))):
                client.set_task_run_state(task_run.id, Crashed(message=f"its flow run {run.name} crashed: {reason}"))
            crashed.append((run.id, run.name, reason))
    return crashed


def _beat(flow_run_id: UUID, interval: float) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        while True:
            time.sleep(interval)
            run = client.read_flow_run(flow_run_id)
            if not (run.state and run.state.is_running()):
                return
            client.update_flow_run_labels(flow_run_id, {HEARTBEAT: f"{time.time():.0f}"})


def on_flow_running(flow, flow_run, state) -> None:
    """on_running hook: crash this flow's dead runs, then record this process and start beating."""
    from prefect import get_client
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(flow_run, flow)
    for run_id, name, reason in crash_stale_runs(flow_run.flow_id, flow_run.id):
        logger.warning("marked flow run %s (%s) CRASHED: %s", name, run_id, reason)
    with get_client(sync_client=True) as client:
        client.update_flow_run_labels(flow_run.id, {**this_process(), HEARTBEAT: f"{time.time():.0f}"})
    threading.Thread(target=_beat, args=(flow_run.id, HEARTBEAT_SECONDS), name="music-heartbeat", daemon=True).start()
