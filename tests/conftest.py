"""Shared fixtures: an isolated state folder per test session, the zoo built in it on first use,
and a real Prefect server on 127.0.0.1.

Whatever the environment holds, the session uses only its own state: every `PREFECT_*`,
`MUSIC_*` and Hugging Face (`HF_*`, `HUGGINGFACE_*`, `TRANSFORMERS_OFFLINE`) variable is cleared (a
`PREFECT_API_URL` would send the suite's runs, and the deployments `music deploy` registers with
live schedules, to someone's real server; a profile under the user's PREFECT_HOME could do the
same; `HF_HUB_OFFLINE=1`, usual on clusters without internet, would turn the tests' local hub into
"not in the cache"; tests that need one set it themselves), Ray's token authentication is off for
the suite's own 127.0.0.1 heads (left unset, a token in the user's `~/.ray` turns it on for `ray
start`, and a local `ray.init()` writes one), PREFECT_HOME points into the session's
temporary MUSIC_HOME, and the server runs with its scheduler off, so no registered schedule ever
starts a run during the suite.

Prefect reads its settings when it is first imported. The server is spawned (and PREFECT_API_URL
set) after collection, only when a selected test is marked `prefect`; such test modules import
prefect, flows and tasks.build_tasks inside their tests, never at module level. `prefect_api` waits
for the server's health.

The tiny builds a test only reads (or copies to resume elsewhere) are made once per session:
`tiny_build` (the shipped tiny spec) and `msic_build` (the shipped MSIC spec), each through the
`music` CLI. A test that changes a build works on a copy (`test_build.copy_build`): fingerprints do not
depend on the output root, so a copy resumes with no work, as the original would."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

TESTS_DATA = Path(__file__).parent / "data"
_server = {}


def pytest_configure(config):
    home = Path(tempfile.mkdtemp(prefix="music-test-home-"))
    for name in [n for n in os.environ if n.startswith(("PREFECT_", "MUSIC_", "HF_", "HUGGINGFACE_")) or n == "TRANSFORMERS_OFFLINE"]:
        del os.environ[name]
    os.environ["MUSIC_HOME"] = str(home)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["PREFECT_HOME"] = str(home / "prefect-client")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED"] = "false"
    config.addinivalue_line("markers", "prefect: needs the session's real Prefect server")
    config.addinivalue_line("markers", "slow: over ~10 s without a server (left out of `make test-fast`)")
    _server["home"] = home


@pytest.hookimpl(trylast=True)  # after `-m` / `-k` deselection: `make test-fast` starts no server
def pytest_collection_modifyitems(session, config, items):
    if any(item.get_closest_marker("prefect") for item in items):
        import sys

        assert "prefect" not in sys.modules, "a test module imported prefect at collection; import it inside tests"
        from flows.ops.server import spawn_server

        _server["process"], _server["api_url"] = spawn_server(port=0)
        os.environ["PREFECT_API_URL"] = _server["api_url"]


def pytest_unconfigure(config):
    if "process" in _server:
        import sys
        import threading

        if "prefect" in sys.modules:
            # Logs still queued here (a flow run flushes its own when it ends) go out while the
            # server answers, not from Prefect's exit hook to a stopped one, retried.
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10, at_exit=False)
        from flows.ops.server import stop_server

        # The server is this process's child: reaped as soon as it exits, its pid goes, which is
        # what stop_server waits for (an unreaped child's pid stays, and it waited out its 30 s).
        threading.Thread(target=_server["process"].wait, daemon=True).start()
        stop_server()
    shutil.rmtree(_server.get("home", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def music_home() -> Path:
    return _server["home"]


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """The API URL of the session's real Prefect server, once it answers."""
    if "process" in _server:
        from flows.ops.server import wait_healthy

        wait_healthy(_server["process"], _server["api_url"])
    return os.environ["PREFECT_API_URL"]


@pytest.fixture(scope="session")
def zoo_root(music_home) -> Path:
    """The zoo folder that `zoo:<name>` resolves to in this session (entries build on first use)."""
    from music_model.paths import zoo_dir

    return zoo_dir()


@pytest.fixture(scope="session")
def dreambench_dir() -> Path:
    return TESTS_DATA / "dreambench"


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """Every training-set stage run on shard 0 of a 6-sample tiny spec, without Prefect (shared by
    the tests that read stage outputs). Returns the spec and {stage: (summary, rows, dropped rows,
    stage folder)}."""
    import pyarrow.parquet as pq
    import yaml

    from data_specs import shipped
    from data_specs.schemas import WORK
    from tasks.engine.contract import read_rows, run_shard
    from tasks.stages import parse_build_spec, stage_chain

    data = yaml.safe_load(shipped("tiny.yaml").read_text())
    data.update(name="stages", num_source_images=6, shard_size=6, output_root=str(tmp_path_factory.mktemp("stages")))
    spec = parse_build_spec(data)
    out = {}
    for link in stage_chain(spec):
        stage, folder = link.stage, link.folder
        summary = run_shard(stage, spec, 0, link.fingerprint, link.upstream_dir)
        assert pq.read_schema(folder / "part-00000.parquet").equals(WORK, check_metadata=False)
        dropped = read_rows(folder / "part-00000.dropped.parquet")
        out[stage.name] = (summary, read_rows(folder / "part-00000.parquet"), dropped, folder)
    return spec, out


def _cli(*args: str) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _shipped_spec(source: str, folder: Path) -> Path:
    """The shipped spec `source` writing under `folder/out` (nothing else changed)."""
    import yaml

    from data_specs import shipped

    data = yaml.safe_load(shipped(source).read_text()) | {"output_root": str(folder / "out")}
    path = folder / source
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def tiny_build(prefect_api, tmp_path_factory) -> dict:
    """`music build` of the shipped tiny spec (name `tiny`): its spec, --json summary, published
    Parquet bytes, build folder, and the task runs per stage of its flow run."""
    import json

    from test_build import data_bytes, task_runs_by_stage

    folder = tmp_path_factory.mktemp("session-tiny")
    spec = _shipped_spec("tiny.yaml", folder)
    _cli("build", str(spec), "--json", str(folder / "summary.json"))
    result = json.loads((folder / "summary.json").read_text())
    return {"spec": spec, "result": result, "bytes": data_bytes(Path(result["dataset"])), "dir": folder / "out" / "tiny",
            "task_runs_by_stage": task_runs_by_stage(prefect_api)}


@pytest.fixture(scope="session")
def msic_build(prefect_api, tmp_path_factory) -> dict:
    """`music msic build` of the shipped MSIC spec (name `msic_tiny`, no training set to check)."""
    folder = tmp_path_factory.mktemp("session-msic")
    spec = _shipped_spec("msic_tiny.yaml", folder)
    _cli("msic", "build", str(spec))
    return {"spec": spec, "dir": folder / "out" / "msic_tiny"}

