"""The tiny training-set build end to end against a real Prefect server: publish, rerun with no
work, a threshold change that reruns only filter and publish, kill -9 and resume, byte identity."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from data_specs import shipped

pytestmark = pytest.mark.prefect


def tiny_spec(tmp_path: Path, name: str, **changes) -> Path:
    data = yaml.safe_load(shipped("tiny.yaml").read_text())
    data["output_root"] = str(tmp_path / "out")
    data["name"] = name
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def music(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=1200, **kwargs)


def build(spec: Path, tmp_path: Path, tag: str) -> dict:
    out = tmp_path / f"{tag}.json"
    done = music("build", str(spec), "--json", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def data_bytes(dataset: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((dataset / "data").glob("*.parquet"))}


def copy_build(build: dict, root: Path) -> Path:
    """A copy of a session build (conftest's `tiny_build`) under `root/out`, and its spec writing
    there: fingerprints do not depend on the output root, so the copy resumes with no work."""
    import shutil

    shutil.copytree(build["dir"], root / "out" / build["dir"].name)
    data = yaml.safe_load(build["spec"].read_text()) | {"output_root": str(root / "out")}
    spec = root / build["spec"].name
    spec.write_text(yaml.safe_dump(data))
    return spec


def task_runs_by_stage(api: str) -> Counter:
    """Task runs per stage of the newest flow run, read from the Prefect API."""
    import httpx

    runs = httpx.post(f"{api}/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1}).json()
    tasks = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [runs[0]["id"]]}}}).json()
    return Counter(t["name"].split("-shard-")[0].split("-")[0] for t in tasks)


def test_tiny_build_publishes_a_loadable_dataset(tiny_build):
    result = tiny_build["result"]
    dataset = Path(result["dataset"])
    assert result["samples"] > 0
    stats = json.loads((dataset / "stats.json").read_text())
    assert stats["samples"] == result["samples"]
    funnel = {row["stage"]: row for row in stats["funnel"]}
    assert funnel["compose"]["rows_in"] == 16
    for row in stats["funnel"]:  # nothing is lost silently: every row is kept or dropped with a reason
        if row["stage"] != "decimate":
            assert row["rows_in"] == row["rows_out"] + sum(row["dropped"].values()), row
    assert funnel["decimate"]["rows_out"] >= funnel["decimate"]["rows_in"]
    card = (dataset / "README.md").read_text()
    assert card.startswith("---\n") and "spec hash" in card and "tiny model zoo" in card
    assert (dataset / "plots" / "funnel.png").exists() and (dataset / "report.md").exists()

    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(dataset / "data" / "*.parquet"), split="train")
    assert len(loaded) == result["samples"]
    first = loaded[0]
    assert first["image"].size == (128, 128)
    assert len(first["references"]) == first["num_subjects"] == len(first["categories"])
    assert first["references"][0].size == (64, 64)
    assert len(first["layout"]) == 64 and set(first["layout"]) <= set(range(first["num_subjects"] + 1))
    # Task runs grow with shards, not samples: 16 sources at shard size 8 = 2 shards per stage.
    assert result["task_runs"] == 9 * 2 + 1
    assert tiny_build["task_runs_by_stage"]["compose"] == 2


def test_rerun_does_no_work_and_threshold_change_reruns_filter_and_publish(tiny_build, tmp_path, prefect_api):
    spec = copy_build(tiny_build, tmp_path)
    again = build(spec, tmp_path, "again")
    assert again["task_runs"] == 0 and again["model_loads"] == 0
    assert all(t["shards_skipped"] == t["shards"] for t in again["stages"])
    assert sum(task_runs_by_stage(prefect_api).values()) == 0

    data = yaml.safe_load(spec.read_text())
    data["filter"]["near_duplicate_clip"] = 0.999
    spec.write_text(yaml.safe_dump(data))
    changed = build(spec, tmp_path, "changed")
    ran = {t["stage"]: t["shards"] - t["shards_skipped"] for t in changed["stages"]}
    assert ran == {**{s: 0 for s in ran}, "filter": 2}
    assert changed["task_runs"] == 3  # 2 filter shards + publish
    assert task_runs_by_stage(prefect_api) == Counter({"filter": 2, "publish": 1})


def test_kill_during_build_then_resume_is_byte_identical(tiny_build, tmp_path, prefect_api):
    first, first_bytes = tiny_build["result"], tiny_build["bytes"]
    spec = tiny_spec(tmp_path, "tiny")  # the same spec, another output root
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "build", str(spec)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    stages = tmp_path / "out" / "tiny" / "stages"
    deadline = time.monotonic() + 600
    while not list(stages.glob("verify/*/*.done.json")):  # kill once the build is well under way
        assert process.poll() is None, "build ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "out" / "tiny" / "dataset").exists()
    resumed = build(spec, tmp_path, "resumed")
    assert resumed["stages"][0]["shards_skipped"] == 2  # compose was done before the kill
    assert data_bytes(Path(resumed["dataset"])) == first_bytes
    ids = [i for p in sorted((Path(resumed["dataset"]) / "data").glob("*.parquet")) for i in pq.read_table(p).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == resumed["samples"] == first["samples"]


def test_each_stage_holds_only_its_own_models(tiny_build):
    """Residency is stage-scoped: while a model stage runs only its roles are loaded; a model the
    next model stage shares (clip: layout, then filter) stays and is not loaded again."""
    from data_specs.build import STAGE_ROLES

    result, stages = tiny_build["result"], tiny_build["dir"] / "stages"
    for stage, roles in STAGE_ROLES.items():
        if not roles or stage == "publish":
            continue
        markers = [json.loads(p.read_text()) for p in stages.glob(f"{stage}/*/*.done.json")]
        assert markers and all(m["resident"] == sorted(roles) for m in markers), (stage, [m["resident"] for m in markers])
    loads = {t["stage"]: t["model_loads"] for t in result["stages"]}
    # One load per model a stage declares, except filter's clip (kept from layout); the vlm of
    # verify is freed during rerender (the editor's stage) and loaded again for annotate.
    assert loads == {"compose": 1, "synthesize": 1, "detect": 1, "verify": 1, "rerender": 2, "annotate": 1,
                     "layout": 2, "decimate": 0, "filter": 0}
    assert result["model_loads"] == 9
