"""Promises the README makes, asserted with real components: `ray://` addresses refused before any
work, a failed shard failing its flow run while the other shards keep their markers, safe loading
(pickles only through `torch.load(weights_only=True)`, a checkpoint's own code never run unless its
spec sets `trust_remote_code`), and a test session that never touches the user's Prefect server.
`msic build` failing on a leaky training set is in tests/test_msic.py, beside the builds it reuses.

Prefect and the flows are imported inside the tests (conftest starts the server after collection)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_build import music, tiny_spec

from data_specs.roles import parse_role_spec
from music_model.roles import load_role
from music_model.roles.smoke import zoo_role_specs
from music_model.zoo import ensure_entry

# --- ray:// --------------------------------------------------------------------------------------


def test_ray_client_addresses_are_refused_before_any_work(tmp_path):
    from flows.runners import RunnerError, check_runner

    with pytest.raises(RunnerError, match="ray:// clients fail with Ray's token auth"):
        check_runner("ray", "ray://127.0.0.1:10001")
    spec = tiny_spec(tmp_path, "tiny")
    for command in (["build", str(spec)], ["worker", "--gpu", "0"]):
        done = music(*command, "--runner", "ray", "--ray-address", "ray://127.0.0.1:10001")
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "ray:// clients fail with Ray's token auth" in done.stderr and "Prefect UI" not in done.stdout
    assert not (tmp_path / "out").exists()


# --- a failed shard ------------------------------------------------------------------------------


@pytest.mark.prefect
def test_a_failed_shard_fails_its_flow_run_and_the_other_shards_keep_their_markers(prefect_api, tmp_path):
    import httpx

    from data_specs.schemas import WORK
    from tasks.engine.build_paths import stage_dir
    from tasks.engine.contract import fingerprint, read_rows, root_fingerprint, run_shard, write_table
    from tasks.engine.markers import part_record
    from tasks.stages import compose, load_build_spec, synthesize

    path = tiny_spec(tmp_path, "tiny-fail", num_source_images=4, shard_size=2)
    spec = load_build_spec(path)
    # Shard 1 of synthesize done, its marker vouching for a part whose targets are not images: detect's
    # shard 1 raises on it (a part that no longer matches its marker would be redone, not fail).
    compose_fp = fingerprint(compose.STAGE, spec, root_fingerprint(spec))
    for shard in (0, 1):
        run_shard(compose.STAGE, spec, shard, compose_fp, None)
    synthesize_fp = fingerprint(synthesize.STAGE, spec, compose_fp)
    run_shard(synthesize.STAGE, spec, 1, synthesize_fp, stage_dir(spec, "compose", compose_fp))
    folder = stage_dir(spec, "synthesize", synthesize_fp)
    rows = [{**r, "image": {"bytes": b"not an image", "path": None}} for r in read_rows(folder / "part-00001.parquet")]
    write_table(rows, WORK, folder / "part-00001.parquet")
    marker = json.loads((folder / "part-00001.done.json").read_text())
    marker["outputs"]["part-00001.parquet"] = part_record(folder / "part-00001.parquet")
    (folder / "part-00001.done.json").write_text(json.dumps(marker))

    done = music("build", str(path))
    assert done.returncode != 0 and "Published" not in done.stdout
    runs = httpx.post(f"{prefect_api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": ["build-tiny-fail"]}}}).json()
    assert [r["state_type"] for r in runs] == ["FAILED"], runs
    tasks = httpx.post(f"{prefect_api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [runs[0]["id"]]}}}).json()
    states = {t["name"]: t["state_type"] for t in tasks}
    assert states["detect-shard-00001"] == "FAILED" and states["synthesize-shard-00000"] == "COMPLETED", states
    assert not any(name.startswith(("verify", "publish")) for name in states)  # nothing ran past the failed stage

    stages = tmp_path / "out" / "tiny-fail" / "stages"
    markers = sorted(p.relative_to(stages).parts[0] + "/" + p.name for p in stages.glob("*/*/*.done.json"))
    assert {"compose/part-00000.done.json", "compose/part-00001.done.json", "synthesize/part-00000.done.json",
            "synthesize/part-00001.done.json"} <= set(markers)
    assert "detect/part-00001.done.json" not in markers
    assert not (tmp_path / "out" / "tiny-fail" / "dataset").exists()


# --- safe loading --------------------------------------------------------------------------------


class Payload:
    """Unpickling it runs code: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pickle ran')",)


def plant_pickle(path: Path, marker: Path) -> None:
    torch.save({"weight": Payload(marker)}, path)
    assert not marker.exists()


def live(path: Path, marker: Path) -> bool:
    """The payload runs when loaded unsafely (so the safe loaders below are what stops it)."""
    torch.load(path, weights_only=False)
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


def test_segment_anything_weights_load_without_unpickling_code(tmp_path):
    from music_model.zoo.vision import SAM_WEIGHTS_FILE

    marker = tmp_path / "ran"
    folder = shutil.copytree(ensure_entry("sam_official"), tmp_path / "sam")
    plant_pickle(folder / SAM_WEIGHTS_FILE, marker)
    assert live(folder / SAM_WEIGHTS_FILE, marker)
    spec = zoo_role_specs()["segmenter_segment_anything"].model_dump() | {"model": str(folder)}
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_role(parse_role_spec(spec))
    assert not marker.exists()


def test_a_training_checkpoint_resumes_without_unpickling_code(tmp_path):
    from music_model.music.training import load_checkpoint

    marker = tmp_path / "ran"
    plant_pickle(tmp_path / "optimizer.pt", marker)
    assert live(tmp_path / "optimizer.pt", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(tmp_path, {}, None, None)
    assert not marker.exists()


REMOTE_CODE = """from pathlib import Path

Path({marker!r}).write_text("remote code ran")

from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "evil"
"""


def with_remote_code(entry: str, folder: Path, marker: Path) -> Path:
    """A copy of zoo entry `entry` whose config names code of its own (transformers' `auto_map`)."""
    shutil.copytree(ensure_entry(entry), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (folder / "evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    return folder


def test_a_checkpoints_own_code_runs_only_when_its_spec_trusts_it(tmp_path):
    marker = tmp_path / "ran"
    transformers_roles = {name: spec for name, spec in zoo_role_specs().items() if spec.backend == "transformers"}
    assert {spec.role for spec in transformers_roles.values()} == {"llm", "vlm", "detector", "segmenter", "clip", "dino"}
    for name, spec in transformers_roles.items():
        folder = with_remote_code(spec.model.removeprefix("zoo:"), tmp_path / name, marker)
        role = load_role(parse_role_spec(spec.model_dump() | {"model": str(folder)}))
        assert role.spec.trust_remote_code is False and not marker.exists(), name
    # The same checkpoint with trust_remote_code: true in its spec: transformers imports its code (a
    # fresh process with its own module cache, so this one's imports stay clean).
    dino = transformers_roles["dino"].model_dump() | {"model": str(tmp_path / "dino"), "trust_remote_code": True}
    code = ("import sys, json; from data_specs.roles import parse_role_spec; from music_model.roles import load_role; "
            "load_role(parse_role_spec(json.loads(sys.argv[1])))")
    subprocess.run([sys.executable, "-c", code, json.dumps(dino)], capture_output=True, text=True, timeout=300,
                   env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert marker.read_text() == "remote code ran"


# --- the test session's own server ---------------------------------------------------------------


@pytest.mark.prefect
def test_the_session_server_is_its_own_with_the_scheduler_off(prefect_api, music_home):
    import httpx

    assert os.environ["PREFECT_API_URL"] == prefect_api and prefect_api.startswith("http://127.0.0.1:")
    record = json.loads((music_home / "prefect" / "server.json").read_text())
    assert record["api_url"] == prefect_api  # the server conftest spawned in this session's MUSIC_HOME
    assert Path(os.environ["PREFECT_HOME"]).is_relative_to(music_home)
    settings = httpx.get(f"{prefect_api}/admin/settings", timeout=30).json()
    assert settings["server"]["services"]["scheduler"]["enabled"] is False


@pytest.mark.slow
def test_a_session_ignores_the_prefect_server_and_profile_of_its_environment(tmp_path):
    """The test above, in a session started from an environment pointing at someone's server (by
    variable and by profile) with the scheduler on: it still runs on its own server."""
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('active = "theirs"\n\n[profiles.theirs]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    theirs = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_PROFILES_PATH": str(profiles),
              "PREFECT_HOME": str(tmp_path / "their-prefect"), "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true",
              "MUSIC_HOME": str(tmp_path / "their-home")}
    test = f"{Path(__file__).name}::test_the_session_server_is_its_own_with_the_scheduler_off"
    done = subprocess.run([sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider"], cwd=Path(__file__).parent,
                          env=theirs, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (tmp_path / "their-prefect").exists() and not (tmp_path / "their-home").exists()
