"""The Prefect server on a real PostgreSQL (Debian's `postgresql` package, a cluster this module
initialises and starts on a free port, stopped after): a build whose server is killed mid-build
resumes on a restarted server byte-identical to the session's SQLite build, and a deployment run by
a process worker against `music server --database-url` publishes the same bytes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_build import data_bytes, tiny_spec
from test_faults import resume_to_the_session_build, start_build, wait_for
from test_ops import stop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from local_postgres import local_cluster, postgres_bin  # noqa: E402  (the benchmark's cluster, shared)

pytestmark = pytest.mark.prefect


@pytest.fixture(scope="module")
def cluster():
    """A PostgreSQL cluster on 127.0.0.1; without the server installed the test is skipped, as `make
    test` said before any test ran (tests/install_postgres.sh), and under CI=true it fails."""
    if postgres_bin("initdb") is None:
        missing = "needs Debian's postgresql (tests/install_postgres.sh installs it; make test runs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    with local_cluster() as running:
        yield running


@pytest.fixture
def postgres(cluster, request):
    """An empty database of its own for the test: its SQLAlchemy URL and the cluster."""
    return {"url": cluster.create_database(request.node.name), "cluster": cluster}


def own_server_env(tmp_path: Path, zoo_root: Path, **extra: str) -> dict:
    """A state folder of its own (so its own server), the session's zoo."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return env | {"MUSIC_HOME": str(tmp_path / "home"), "MUSIC_ZOO_DIR": str(zoo_root),
                  "MUSIC_SLOT_DIR": str(tmp_path / "slots"), **extra}


def rows(postgres: dict, query: str) -> int:
    return postgres["cluster"].count(postgres["url"], query)


def test_a_server_on_postgres_killed_mid_build_restarts_and_the_build_resumes_byte_identical(
        postgres, tmp_path, zoo_root, tiny_build):
    """Prefect's own setting in the environment puts the server on PostgreSQL; SIGKILL it during the
    build: the build exits 2 in seconds, the next `music build` starts a server on the same database
    and completes the session's bytes."""
    env = own_server_env(tmp_path, zoo_root, PREFECT_API_DATABASE_CONNECTION_URL=postgres["url"])
    spec = tiny_spec(tmp_path, "tiny")
    build = start_build(spec, env)
    wait_for(tmp_path / "out" / "tiny" / "stages", "verify/*/*.done.json", build)
    server = json.loads((tmp_path / "home" / "prefect" / "server.json").read_text())
    assert server["database"] == postgres["url"]
    os.killpg(server["pid"], signal.SIGKILL)
    _, stderr = build.communicate(timeout=120)
    assert build.returncode == 2 and "stopped answering" in stderr, stderr[-3000:]

    resumed = resume_to_the_session_build(spec, env, tmp_path, tiny_build)
    # Both flow runs and their task runs are PostgreSQL's; no SQLite database was made.
    assert rows(postgres, "select count(*) from flow_run where name = 'build-tiny'") == 2
    assert rows(postgres, "select count(*) from task_run") >= resumed["task_runs"]
    assert not list((tmp_path / "home").rglob("*.db"))
    subprocess.run([sys.executable, "-m", "flows.cli", "server", "stop"], env=env, capture_output=True, timeout=60)


def test_a_deployment_run_by_a_worker_on_a_postgres_server_publishes_the_same_bytes(postgres, tmp_path, zoo_root, tiny_build):
    env = own_server_env(tmp_path, zoo_root)
    started = subprocess.run([sys.executable, "-m", "flows.cli", "server", "--database-url", postgres["url"]], env=env,
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-3000:]
    assert f"Database: {postgres['url']}" in started.stdout
    api = re.search(r"^Prefect UI: (\S+)$", started.stdout, re.M).group(1) + "/api"
    other = subprocess.run([sys.executable, "-m", "flows.cli", "server", "--database-url", f"{postgres['url']}_other"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and other.stderr.strip().splitlines() == [
        f"error: the server of this state folder ({api}) runs on {postgres['url']}, not {postgres['url']}_other: "
        "`music server stop` first"], other.stderr
    env["PREFECT_API_URL"] = api
    worker = None
    try:
        deployed = subprocess.run([sys.executable, "-m", "flows.cli", "deploy"], env=env, capture_output=True, text=True,
                                  timeout=300)
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        with open(tmp_path / "worker.log", "w") as log:
            worker = subprocess.Popen([sys.executable, "-m", "flows.cli", "worker", "--name", "postgres-worker"],
                                      env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        spec = tiny_spec(tmp_path, "tiny")
        run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "build-training-set/rebuild-tiny",
                              "--param", f"spec_path={spec}", "--watch", "--watch-timeout", "900"],
                             env=env, capture_output=True, text=True, timeout=1000)
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
        assert data_bytes(tmp_path / "out" / "tiny" / "dataset") == tiny_build["bytes"]
        assert rows(postgres, "select count(*) from deployment") >= 1
        assert rows(postgres, "select count(*) from flow_run where state_type = 'COMPLETED' "
                              "and deployment_id is not null") == 1
    finally:
        if worker:
            stop(worker)
        subprocess.run([sys.executable, "-m", "flows.cli", "server", "stop"], env=env, capture_output=True, timeout=60)
