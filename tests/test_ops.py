"""Operations with real components: `music deploy` against the session's Prefect server, a process
worker running `prefect deployment run` of the tiny rebuild, a killed build's RUNNING run marked
CRASHED by the next run, and the tiny build on a local Ray cluster byte-identical to the
thread-pool run, its model stages on GPU actors that survive a killed worker."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_build import data_bytes, music, tiny_spec

pytestmark = pytest.mark.prefect
ROOT = Path(__file__).resolve().parent.parent


def api_post(api: str, path: str, body: dict) -> list[dict]:
    import httpx

    response = httpx.post(f"{api}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def flow_run(api: str, run_id: str) -> dict:
    import httpx

    return httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json()


def stop(process: subprocess.Popen, grace: float = 5) -> None:
    """SIGTERM our process group, twice if need be: a Prefect worker turns the first SIGTERM into a
    SIGINT it may sit on (the second is its SIGKILL), and `ray start --block` leaves its GCS
    running after the first."""
    for _ in range(2):
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def killed_run(prefect_api, tmp_path_factory) -> str:
    """A tiny build killed with SIGKILL while a shard task runs: its flow run and that task run stay
    RUNNING (its device slots come back at once: the kernel drops a dead process's locks)."""
    tmp_path = tmp_path_factory.mktemp("killed")
    spec = tiny_spec(tmp_path, "tiny-killed")
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "build", str(spec)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, "the build ended before it could be killed"
        assert time.monotonic() < deadline, "the build's flow run never recorded its process"
        runs = api_post(prefect_api, "/flow_runs/filter", {"flow_runs": {"name": {"any_": ["build-tiny-killed"]}}})
        if runs and runs[0]["state_type"] == "RUNNING" and runs[0]["labels"].get("music.pid") == str(process.pid):
            tasks = api_post(prefect_api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [runs[0]["id"]]}},
                                                                "task_runs": {"state": {"type": {"any_": ["RUNNING"]}}}})
            if tasks:
                break
        time.sleep(0.3)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert flow_run(prefect_api, runs[0]["id"])["state_type"] == "RUNNING"  # what Prefect alone leaves behind
    return runs[0]["id"]


@pytest.fixture(scope="module")
def worker(prefect_api, tmp_path_factory):
    """`music deploy`, then `music worker` polling the pool."""
    deployed = music("deploy")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "flows.cli", "worker", "--name", "test-worker"],
                                   env={**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "2"}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    yield {"deploy_output": deployed.stdout, "log": log}
    stop(process)


@pytest.fixture(scope="module")
def deployment_run(worker, killed_run, prefect_api, tmp_path_factory) -> dict:
    """`prefect deployment run` of the tiny rebuild with a spec writing under tmp; the worker runs it."""
    tmp_path = tmp_path_factory.mktemp("deployed")
    spec = tiny_spec(tmp_path, "tiny")
    done = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "build-training-set/rebuild-tiny",
                           "--param", f"spec_path={spec}", "--watch", "--watch-timeout", "900"],
                          capture_output=True, text=True, timeout=1000)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout)
    assert match, done.stdout[-3000:] + done.stderr[-3000:]
    return {"id": match.group(1), "output": done.stdout + done.stderr, "returncode": done.returncode, "spec": spec,
            "dataset": tmp_path / "out" / "tiny" / "dataset"}


def test_deploy_registers_the_declared_deployments_with_schedules(worker, prefect_api):
    deployments = {d["name"]: d for d in api_post(prefect_api, "/deployments/filter", {})}
    assert {"rebuild", "rebuild-tiny", "regenerate", "train", "evaluate-dreambench", "pipeline"} <= deployments.keys()
    tiny = deployments["rebuild-tiny"]
    assert tiny["work_pool_name"] == "music-gpu" and tiny["parameters"] == {"spec_path": "data_specs/tiny.yaml"}
    assert [s["schedule"]["cron"] for s in tiny["schedules"]] == ["0 3 * * 1"]
    assert tiny["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(ROOT)
    assert "build-training-set/rebuild-tiny" in worker["deploy_output"]


def test_deployment_run_completes_on_the_worker_with_readable_artifacts(deployment_run, prefect_api):
    assert deployment_run["returncode"] == 0, deployment_run["output"][-3000:]
    run = flow_run(prefect_api, deployment_run["id"])
    assert run["state_type"] == "COMPLETED"
    # Executed by the process worker: the flow's own process is the one the worker started.
    assert run["work_pool_name"] == "music-gpu" and run["name"] == "build-tiny"
    assert run["infrastructure_pid"].split(":")[-1] == run["labels"]["music.pid"]
    artifacts = api_post(prefect_api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [deployment_run["id"]]}}})
    by_type = Counter(a["type"] for a in artifacts)
    # markdown: the build report and the release's diff (the release history under the spec's key)
    assert by_type["table"] >= 9 and by_type["progress"] >= 9 and by_type["markdown"] == 2, by_type
    assert {a["key"] for a in artifacts if a["type"] == "markdown"} == {"tiny-report", "tiny-release"}
    report = next(a for a in artifacts if a["key"] == "tiny-report")
    assert "| compose |" in report["data"]
    compose = next(a for a in artifacts if a["key"] == "tiny-compose")
    assert json.loads(compose["data"])[0]["rows_in"] == 16
    assert len(data_bytes(deployment_run["dataset"])) > 0


def test_next_run_marks_the_killed_run_crashed(deployment_run, killed_run, prefect_api):
    run = flow_run(prefect_api, killed_run)
    assert run["state_type"] == "CRASHED", run["state"]
    assert f"its process {run['labels']['music.pid']} on {socket.gethostname()} no longer exists" in run["state"]["message"]
    # Its unfinished task runs are closed with it, so nothing in the UI stays RUNNING.
    tasks = api_post(prefect_api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [killed_run]}}})
    states = Counter(t["state_type"] for t in tasks)
    assert states["CRASHED"] >= 1 and states["RUNNING"] == 0, states


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on 127.0.0.1 in our own process group, declaring 2 GPUs (Ray schedules on the
    declared count; on this CPU machine the tasks then compute on CPUs)."""
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log = tmp_path_factory.mktemp("ray") / "ray.log"
    ray = Path(sys.executable).parent / "ray"
    with open(log, "w") as out:
        process = subprocess.Popen([str(ray), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
                                    "--num-gpus", "2", "--disable-usage-stats"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while subprocess.run([str(ray), "status", "--address", address], env=env, capture_output=True).returncode != 0:
        assert process.poll() is None, log.read_text()[-3000:]
        if time.monotonic() > deadline:
            stop(process)  # no head left behind for the rest of the session
            pytest.fail("the Ray head did not come up in 120 s")
        time.sleep(0.5)
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}"}
    stop(process)


def test_ray_run_keeps_models_on_gpu_actors_survives_a_killed_worker_and_is_byte_identical(deployment_run, ray_head, tmp_path):
    """Model stages run on 2 actors (one per declared GPU) that keep a stage's models: loads are
    actors x model loads of the local run, not shards. One actor's process is killed with SIGKILL
    mid-build: Ray restarts it, its shard is retried, and the data is byte-identical anyway."""
    from ray.util.state import list_actors, list_tasks

    assert deployment_run["returncode"] == 0
    spec = tiny_spec(tmp_path, "tiny")
    out = tmp_path / "ray.json"
    build = subprocess.Popen([sys.executable, "-m", "flows.cli", "build", str(spec), "--runner", "ray", "--ray-address",
                              ray_head["address"], "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    stages = tmp_path / "out" / "tiny" / "stages"
    deadline = time.monotonic() + 900
    while not list(stages.glob("detect/*/*.done.json")):  # kill once model stages are under way
        assert build.poll() is None, build.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    alive = [a for a in list_actors(address=ray_head["dashboard"], filters=[("state", "=", "ALIVE")], detail=True)
             if a.class_name == "ShardWorker"]
    assert len(alive) == 2 and all(a.required_resources.get("GPU") == 1 for a in alive), alive
    victim = alive[0]
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = sorted(p.parent.parent.name for p in stages.glob("*/*/*.done.json"))
    output, _ = build.communicate(timeout=900)
    assert build.returncode == 0, output[-3000:]
    result = json.loads(out.read_text())
    assert result["task_runs"] == 9 * 2 + 1
    assert data_bytes(Path(result["dataset"])) == data_bytes(deployment_run["dataset"])
    restarted = [a for a in list_actors(address=ray_head["dashboard"], detail=True) if a.actor_id == victim.actor_id]
    assert restarted and restarted[0].num_restarts >= 1, restarted
    # 2 actors x the local run's 9 loads, plus the killed actor's reloads: never one load per shard per role.
    assert 18 <= result["model_loads"] < 18 + 9, result["model_loads"]
    print(f"killed actor {victim.actor_id} (pid {victim.pid}) after {len(killed_at)} shard markers; restarts "
          f"{restarted[0].num_restarts}; model loads {result['model_loads']}; wall {result['wall_seconds']} s")

    # The shard tasks only wait for an actor: no task asks for a GPU (the actors hold them).
    deadline = time.monotonic() + 60
    while True:  # Ray reports task events asynchronously: the last ones arrive a little later
        tasks = [t for t in list_tasks(address=ray_head["dashboard"], detail=True, limit=1000, raise_on_missing_output=False)
                 if t.name == "stage-shard" and t.state == "FINISHED"]
        if len(tasks) >= 18 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert len(tasks) >= 18 and not any(t.required_resources.get("GPU", 0) for t in tasks)


def test_bad_runner_choices_fail_before_any_work(tmp_path):
    spec = tiny_spec(tmp_path, "tiny")
    for args, message in [(["--runner", "ray"], "GCS address"), (["--runner", "ray", "--ray-address", "auto"], "start a new local Ray"),
                          (["--runner", "dask"], "runner must be one of"), (["--ray-address", "127.0.0.1:6379"], "only used with --runner ray")]:
        done = music("build", str(spec), *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    assert not (tmp_path / "out").exists()


def test_server_profile_names_the_server_and_keeps_the_users_profiles(tmp_path):
    """`music server`'s `music` profile: created, then updated in place (a new port), beside the
    user's own profiles and their active choice, owner-only like Prefect's own file."""
    from prefect.settings import PREFECT_API_URL, PREFECT_PROFILES_PATH, load_profiles, temporary_settings

    from flows.ops.server import save_profile

    path = tmp_path / "profiles.toml"
    path.write_text('active = "mine"\n\n[profiles.mine]\nPREFECT_API_URL = "http://10.0.0.1:4200/api"\n')
    with temporary_settings({PREFECT_PROFILES_PATH: path}):
        assert save_profile("http://127.0.0.1:4200/api") == (path, "mine")
        assert save_profile("http://127.0.0.1:4301/api") == (path, "mine")
        profiles = load_profiles()
    assert profiles.active_name == "mine"
    assert profiles["music"].settings[PREFECT_API_URL] == "http://127.0.0.1:4301/api"
    assert profiles["mine"].settings[PREFECT_API_URL] == "http://10.0.0.1:4200/api"
    assert path.stat().st_mode & 0o777 == 0o600
