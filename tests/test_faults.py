"""Faults of the things a build depends on: the Prefect server killed mid-build (and restarted),
and the build itself stopped with SIGTERM. What is finished stays finished, nothing waits for a
slot held by the dead, and the process says what happened in one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_build import data_bytes, tiny_spec
from test_ops import api_post, flow_run

from music_model.roles.slots import Slot, free_slots

pytestmark = pytest.mark.prefect
CPU_SLOTS = [Slot("cpu-0", "cpu"), Slot("cpu-1", "cpu")]  # what the local runner's 2 workers share


def start_build(spec: Path, env: dict, json_out: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "flows.cli", "build", str(spec)] + (["--json", str(json_out)] if json_out else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(path_glob: Path, pattern: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not list(path_glob.glob(pattern)):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {pattern} after {timeout} s"
        time.sleep(0.2)


def resume_to_the_session_build(spec: Path, env: dict, tmp_path: Path, tiny_build: dict) -> dict:
    """`music build` again after the server died mid-build: it resumes from the finished shards and
    publishes the session's bytes; its --json result."""
    resumed_out = tmp_path / "resumed.json"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "build", str(spec), "--json", str(resumed_out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads(resumed_out.read_text())
    assert resumed["stages"][0]["shards_skipped"] == 2  # compose was finished before the server died
    assert data_bytes(Path(resumed["dataset"])) == tiny_build["bytes"]
    return resumed


def test_server_killed_mid_build_fails_fast_then_a_rerun_resumes_byte_identical(tmp_path, zoo_root, tiny_build):
    """A build on its own server (its own MUSIC_HOME): SIGKILL the server during the build. The
    build exits with code 2 within seconds, one line naming the API and what to do; the next
    `music build` starts a new server on the same database and completes the same bytes as an
    undisturbed build (the session's); no slot stays held."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"MUSIC_HOME": str(home), "MUSIC_ZOO_DIR": str(zoo_root), "MUSIC_SLOT_DIR": str(tmp_path / "slots")}
    spec = tiny_spec(tmp_path, "tiny")
    build = start_build(spec, env)
    wait_for(tmp_path / "out" / "tiny" / "stages", "verify/*/*.done.json", build)
    server = json.loads((home / "prefect" / "server.json").read_text())
    os.killpg(server["pid"], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = build.communicate(timeout=120)
    seconds = time.monotonic() - killed
    assert build.returncode == 2, stderr[-3000:]
    assert f"the Prefect server at {server['api_url']} stopped answering" in stderr and "music server" in stderr
    assert seconds < 30, seconds
    print(f"server killed -> build exited in {seconds:.1f} s with {len(stderr.splitlines())} stderr lines")

    resume_to_the_session_build(spec, env, tmp_path, tiny_build)
    os.environ["MUSIC_SLOT_DIR"] = env["MUSIC_SLOT_DIR"]
    try:
        assert free_slots(CPU_SLOTS) == 2
    finally:
        os.environ.pop("MUSIC_SLOT_DIR")
    subprocess.run([sys.executable, "-m", "flows.cli", "server", "stop"], env=env, capture_output=True, timeout=60)


def test_sigterm_ends_a_build_within_seconds_with_its_run_crashed_and_slots_free(tmp_path, prefect_api):
    env = {**os.environ, "MUSIC_SLOT_DIR": str(tmp_path / "slots")}
    spec = tiny_spec(tmp_path, "tiny-sigterm")
    build = start_build(spec, env)
    wait_for(tmp_path / "out" / "tiny-sigterm" / "stages", "synthesize/*/*.done.json", build)
    build.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = build.communicate(timeout=120)
    seconds = time.monotonic() - sent
    assert build.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM: flow runs ended: build-tiny-sigterm" in stderr
    assert seconds < 20, seconds
    print(f"SIGTERM -> build exited in {seconds:.1f} s")
    run = api_post(prefect_api, "/flow_runs/filter", {"flow_runs": {"name": {"any_": ["build-tiny-sigterm"]}}})[0]
    assert flow_run(prefect_api, run["id"])["state_type"] == "CRASHED"
    tasks = api_post(prefect_api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    assert not [t for t in tasks if t["state_type"] == "RUNNING"]
    os.environ["MUSIC_SLOT_DIR"] = env["MUSIC_SLOT_DIR"]
    try:
        assert free_slots(CPU_SLOTS) == 2
    finally:
        os.environ.pop("MUSIC_SLOT_DIR")
    # No shard is half-written: each part is whole (written to a temporary file, then renamed), and
    # a shard the signal stopped between its parts and its marker (written last) is not done: the
    # rerun redoes it, as for a kill.
    import pyarrow.parquet as pq

    parts = list((tmp_path / "out" / "tiny-sigterm" / "stages").glob("*/*/part-*[0-9].parquet"))
    assert parts
    for part in parts:
        pq.read_metadata(part)  # a torn file has no footer
