"""Releases on a copy of the session's tiny build, against the session's real Prefect server: a
rebuild that fails its gate is kept as a rejected release, leaves dataset/ byte-identical, ends its
flow run Failed with the gate's line and notifies a real Custom Webhook block (a receiver on
127.0.0.1); an accepted one becomes current and notifies its summary; every release loads with
`datasets`; rollback, then a rebuild resumes to the same bytes with no stage rerun; kill -9 in the
release step leaves the previous release current and a rerun makes no second release."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from test_build import copy_build, data_bytes
from typer.testing import CliRunner

pytestmark = pytest.mark.prefect


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def variant(spec: Path, name: str, **sections) -> Path:
    data = yaml.safe_load(spec.read_text())
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    path = spec.with_name(name)
    path.write_text(yaml.safe_dump(data))
    return path


class Receiver:
    """A webhook receiver on 127.0.0.1 that records each POST with its arrival time; it serves on
    a daemon thread and shuts itself down after `limit` seconds at most."""

    def __init__(self, limit: float = 300):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append((time.time(), json.loads(self.rfile.read(int(self.headers["content-length"])))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.timer = threading.Timer(limit, self.server.shutdown)
        self.timer.start()

    def wait_for(self, text: str, timeout: float = 60) -> tuple[float, dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for at, body in self.received:
                if text in body["subject"]:
                    return at, body
            time.sleep(0.1)
        raise AssertionError(f"no notification with {text!r} in {timeout} s; got {self.received}")

    def close(self):
        self.timer.cancel()
        self.server.shutdown()


def music(*args: str):
    """The `music` command in this process (its imports are done: seconds saved a call)."""
    from flows.cli.main import app

    return CliRunner().invoke(app, list(args))


def newest_flow_run(api: str) -> dict:
    import httpx

    return httpx.post(f"{api}/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1}).json()[0]


def event_time(api: str, name: str, timeout: float = 60) -> float:
    """When the newest event of this name occurred (server's record), seconds since the epoch. The
    server's triggers act on an event before its persister writes it in a batch: a notification can
    come before the event is found, so this waits for it."""
    from datetime import datetime

    import httpx

    deadline = time.time() + timeout
    while not (events := httpx.post(f"{api}/events/filter", json={"filter": {"event": {"name": [name]}}, "limit": 1}).json()["events"]):
        assert time.time() < deadline, f"no {name} event on the server in {timeout} s"
        time.sleep(0.2)
    return datetime.fromisoformat(events[0]["occurred"].replace("Z", "+00:00")).timestamp()


def test_gate_failure_alert_rollback_and_resume(tiny_build, prefect_api, tmp_path):
    import datasets

    from flows.build import build_training_set
    from flows.ops.alerts import register_automations
    from tasks.publishing import releases

    spec = copy_build(tiny_build, tmp_path)
    dataset = tmp_path / "out" / "tiny" / "dataset"
    samples = tiny_build["result"]["samples"]
    assert releases.current(dataset)["version"] == "v1"
    receiver = Receiver()
    try:
        assert register_automations(webhook=receiver.url)
        # 1. A publish-only change (a cap) under a gate it fails: rejected, dataset/ untouched, the run Failed.
        before = folder_bytes(dataset)
        failing = variant(spec, "capped.yaml", publish={"max_samples": samples - 1}, release={"gates": {"min_samples": samples}})
        done = music("build", str(failing))
        gate = f"tiny dataset v2: gate min_samples: {samples - 1} samples, fewer than {samples}"
        assert done.exit_code == 4 and f"error: {gate}" in done.stderr.splitlines(), done.output[-2000:]
        run = newest_flow_run(prefect_api)
        assert run["state_type"] == "FAILED" and gate in run["state"]["message"]
        assert folder_bytes(dataset) == before
        assert releases.read_record(dataset.parent / "releases" / "v2")["status"] == "rejected"
        at, body = receiver.wait_for("rejected")
        print(f"gate notification {at - event_time(prefect_api, 'music.release.gate-failed'):.2f} s after its event")
        assert "tiny" in body["subject"] and "v2" in body["subject"] and "gate min_samples" in body["body"]
        # 2. An accepted change: v3 is current, its summary is told.
        accepted = variant(spec, "smaller.yaml", publish={"max_samples": samples - 2})
        result = build_training_set(str(accepted))
        assert result["release"]["version"] == "v3" and result["release"]["parent"] == "v1"
        at, body = receiver.wait_for("v3 published")
        print(f"release notification {at - event_time(prefect_api, 'music.release.published'):.2f} s after its event")
        assert f"v1 -> v3: {samples} -> {samples - 2} samples; added 0, removed 2, changed 0" in body["body"]
        assert sum("rejected" in b["subject"] for _, b in receiver.received) == 1  # one notification per gate failure
    finally:
        receiver.close()
    # 3. Every release loads with `datasets`; unchanged shards are hard links, not copies.
    root = dataset.parent / "releases"
    for version, count in (("v1", samples), ("v3", samples - 2)):
        loaded = datasets.load_dataset("parquet", data_files=str(root / version / "data" / "*.parquet"), split="train",
                                       cache_dir=str(tmp_path / "hf"))
        assert len(loaded) == count and loaded[0]["image"].size == (128, 128)
    inodes = {p.stat().st_ino for p in (root / "v1" / "data").glob("*.parquet")}
    assert any(p.stat().st_ino in inodes for p in (root / "v3" / "data").glob("*.parquet"))
    change = json.loads((root / "v3" / "diff.json").read_text())
    assert change["causes"] == [f"publish: publish {json.dumps({'rows_per_file': 16, 'max_samples': None})} -> "
                                f"{json.dumps({'rows_per_file': 16, 'max_samples': samples - 2})}"]
    # 4. Rollback makes v1 current; a rebuild of v3's spec resumes to v3's bytes, no stage rerun, no new release.
    v3 = data_bytes(dataset)
    assert music("release", "rollback", str(accepted)).exit_code == 0
    assert releases.current(dataset)["version"] == "v1" and data_bytes(dataset) == tiny_build["bytes"]
    result = build_training_set(str(accepted))
    assert result["task_runs"] == 0 and data_bytes(dataset) == v3
    assert [r["version"] for r in releases.releases(dataset)] == ["v1", "v2", "v3"]
    # 5. The rejected candidate, promoted by hand, becomes current.
    assert music("release", "promote", str(failing), "v2").exit_code == 0
    assert releases.current(dataset)["version"] == "v2" and len(data_bytes(dataset)) > 0


KILL_IN_RELEASE_STEP = """
import os, signal, sys
from tasks.publishing import releases
from flows.build import build_training_set

def killed(*args, **kwargs):  # the release folder is in place; the published folder not yet swapped
    os.kill(os.getpid(), signal.SIGKILL)

releases.make_current = killed
build_training_set(sys.argv[1])
"""


def test_kill_in_release_step_keeps_previous_release(tiny_build, tmp_path):
    from flows.build import build_training_set
    from tasks.publishing import releases

    spec = variant(copy_build(tiny_build, tmp_path), "capped.yaml", publish={"max_samples": tiny_build["result"]["samples"] - 1})
    dataset = tmp_path / "out" / "tiny" / "dataset"
    before = folder_bytes(dataset)
    done = subprocess.run([sys.executable, "-c", KILL_IN_RELEASE_STEP, str(spec)], capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    assert folder_bytes(dataset) == before and releases.current(dataset)["version"] == "v1"
    assert [r["version"] for r in releases.releases(dataset)] == ["v1", "v2"]
    result = build_training_set(str(spec))  # the rerun finds v2 and makes it current: no second release
    assert result["release"]["version"] == "v2" and releases.current(dataset)["version"] == "v2"
    assert [r["version"] for r in releases.releases(dataset)] == ["v1", "v2"]


def test_msic_publishes_releases_with_content_hashes(msic_build):
    import pyarrow.parquet as pq

    from tasks.publishing import releases

    folder = msic_build["dir"] / "msic"
    record = releases.current(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    table = pq.read_table(next((folder / "data").glob("*.parquet")), columns=["case_id", "content_hash"]).to_pylist()
    assert record["version"] == "v1" and record["kind"] == "msic" and record["samples"] == len(table)
    assert manifest["cases"] == {row["case_id"]: row["content_hash"] for row in table}


def test_gates_are_checked_before_any_model(tmp_path):
    from data_specs.roles import SpecError
    from tasks.stages import load_build_spec

    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({**yaml.safe_load((Path(__file__).parents[1] / "data_specs" / "tiny.yaml").read_text()),
                                    "release": {"gates": {"score_bounds": {"reference_dino": {"p51": [0.5, None]}}}}}))
    with pytest.raises(SpecError) as error:
        load_build_spec(spec)
    assert "release.gates.score_bounds" in str(error.value) and "p51" in str(error.value) and "\n" not in str(error.value)
