"""How a flow run ends when its process, its server or its operator stops it.

- A process that died (kill -9, OOM, a lost machine) cannot report its own end, and Prefect leaves
  its run RUNNING for ever. So each run records its process in its labels (host, pid, the pid's
  start time) and beats a heartbeat label; the next run of that flow crashes every other RUNNING
  run whose process is gone (same host: the pid with that start time no longer exists) or whose
  heartbeat stopped (another host). Runs without these labels are not judged.
- The server going away while a flow body runs inside `stop_promptly`: a watchdog polls its health
  and, after `SERVER_DOWN_PROBES` failed probes in a row, prints one line naming the API URL and what to do and exits with code 2, instead of
  minutes of retry tracebacks. Finished shards stay finished (markers); a rerun resumes.
- SIGTERM or Ctrl-C: `stop_promptly` marks the process's runs CANCELLED (when the server asked for
  the cancellation) or CRASHED, with their running task runs, and exits at once: a shard running
  in a thread cannot be interrupted, and its outputs are written atomically, so nothing is lost but
  that shard's work. Device slots are released by the kernel with the process.
Attach `on_flow_running` as a flow's on_running hook."""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

import psutil

from music_model import settings
from tasks.engine import faults

HOST, PID, PID_STARTED, HEARTBEAT = "music.host", "music.pid", "music.pid_started", "music.heartbeat"
# A run on another host is stale after this many missed beats.
STALE_BEATS = 4
SERVER_PROBE_TIMEOUT = 10.0
SERVER_DOWN_PROBES = 3
EXIT_SERVER_GONE = 2


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
    if silent > STALE_BEATS * settings.HEARTBEAT_SECONDS.number():
        return f"no heartbeat from its process {pid} on {host} for {silent:.0f} s"
    return None


def _end_runs(client, runs, state_for, reason: str) -> None:
    """Give each flow run the state `state_for(run)` makes, and crash its RUNNING task runs."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Crashed

    for run in runs:
        # Orchestrated first, so the transition releases what the run held; forced if refused.
        if client.set_flow_run_state(run.id, state_for(run)).status != SetStateStatus.ACCEPT:
            client.set_flow_run_state(run.id, state_for(run), force=True)
        for task_run in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING])))):
            client.set_task_run_state(task_run.id, Crashed(message=f"its flow run {run.name} ended: {reason}"), force=True)


def _running_runs(client, flow_id: UUID | None = None):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    return client.read_flow_runs(
        flow_filter=FlowFilter(id=FlowFilterId(any_=[flow_id])) if flow_id else None,
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.CANCELLING]))),
    )


def crash_stale_runs(flow_id: UUID, current_run: UUID | None = None) -> list[tuple[UUID, str, str]]:
    """Mark the flow's RUNNING runs whose process is gone CRASHED, with their RUNNING task runs;
    returns (id, name, reason) of each."""
    from prefect import get_client
    from prefect.states import Crashed

    crashed = []
    with get_client(sync_client=True) as client:
        now = time.time()
        for run in _running_runs(client, flow_id):
            if run.id == current_run or not (reason := why_stale(dict(run.labels or {}), now)):
                continue
            message = f"Crashed: found RUNNING by a later run of this flow, but {reason}"
            _end_runs(client, [run], lambda _: Crashed(message=message), reason)
            crashed.append((run.id, run.name, reason))
    return crashed


def _this_process_runs(client) -> list:
    mine = this_process()
    return [run for run in _running_runs(client) if all((run.labels or {}).get(k) == v for k, v in mine.items())]


def crash_this_process_runs(reason: str) -> None:
    """Mark this process's RUNNING flow runs, and their running task runs, CRASHED with `reason`."""
    from prefect import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        _end_runs(client, _this_process_runs(client), lambda _: Crashed(message=reason), reason)


# An operational failure (`tasks.engine.faults`) exits at once: the process's runs say why in the UI.
faults.before_exit.append(crash_this_process_runs)

_guarded = 0  # flow bodies inside `stop_promptly` in this process
_guarded_lock = threading.Lock()


@contextmanager
def stop_promptly() -> Iterator[None]:
    """Around a flow body that waits on shard tasks: SIGTERM (Prefect raises TerminationSignal) or
    Ctrl-C ends the process within seconds instead of after the running shards, with its runs
    CANCELLED when the server asked for it (UI cancel), else CRASHED; and while inside, the server
    watchdog exits when the server goes away (outside, a stopped server is no fault of ours: a
    test session or a notebook that ran a flow stays up)."""
    from prefect.exceptions import TerminationSignal

    global _guarded
    start_server_watchdog()
    with _guarded_lock:
        _guarded += 1
    try:
        yield
    except (KeyboardInterrupt, TerminationSignal) as stop:
        from prefect import get_client
        from prefect.states import Cancelled, Crashed

        name = "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else "SIGTERM"
        reason = f"stopped by {name}"
        try:
            with get_client(sync_client=True) as client:
                runs = _this_process_runs(client)
                _end_runs(client, runs, lambda run: Cancelled(message=reason) if run.state.is_cancelling()
                          else Crashed(message=f"{reason}; finished shards are kept, a rerun resumes"), reason)
            ended = ", ".join(run.name for run in runs) or "none"
        except Exception as error:  # the server may be what is gone
            ended = f"none (the server did not answer: {error})"
        print(f"{reason}: flow runs ended: {ended}. Finished shards are kept; rerun the same command to resume.",
              file=sys.stderr, flush=True)
        os._exit(130 if name == "Ctrl-C" else 128 + signal.SIGTERM)
    finally:
        with _guarded_lock:
            _guarded -= 1


def _server_alive(api_url: str) -> bool:
    """Any HTTP answer counts (a busy server says 503); a refused or timed-out connection does not."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=SERVER_PROBE_TIMEOUT):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _watch_server(api_url: str) -> None:
    failures = 0
    while True:
        time.sleep(settings.SERVER_PROBE_SECONDS.number())
        failures = 0 if _server_alive(api_url) else failures + 1
        if failures >= SERVER_DOWN_PROBES and _guarded:
            print(f"error: the Prefect server at {api_url} stopped answering. Finished shards are kept: restart it "
                  "with `music server`, then rerun the same command to resume.", file=sys.stderr, flush=True)
            os._exit(EXIT_SERVER_GONE)


_watchdog_started = threading.Lock()


def start_server_watchdog() -> None:
    """Once per process: a thread that exits cleanly soon after the Prefect server goes away while a
    flow body is inside `stop_promptly`."""
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if api_url and _watchdog_started.acquire(blocking=False):
        threading.Thread(target=_watch_server, args=(api_url,), name="music-server-watchdog", daemon=True).start()


def _beat(flow_run_id: UUID, interval: float) -> None:
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            while True:
                time.sleep(interval)
                run = client.read_flow_run(flow_run_id)
                if not (run.state and run.state.is_running()):
                    return
                client.update_flow_run_labels(flow_run_id, {HEARTBEAT: f"{time.time():.0f}"})
    except Exception:  # the server is gone or restarting: the watchdog or the next run deals with it
        return


def on_flow_running(flow, flow_run, state) -> None:
    """on_running hook: crash this flow's dead runs, then record this process and start beating."""
    from prefect import get_client
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(flow_run, flow)
    for run_id, name, reason in crash_stale_runs(flow_run.flow_id, flow_run.id):
        logger.warning("marked flow run %s (%s) CRASHED: %s", name, run_id, reason)
    with get_client(sync_client=True) as client:
        client.update_flow_run_labels(flow_run.id, {**this_process(), HEARTBEAT: f"{time.time():.0f}"})
    threading.Thread(target=_beat, args=(flow_run.id, settings.HEARTBEAT_SECONDS.number()), name="music-heartbeat", daemon=True).start()
