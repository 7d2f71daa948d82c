"""The tiny training-set build end to end against a real Prefect server: publish, rerun with no
work, changes that rerun exactly the stages that read them, an added stage, a damaged part redone,
one build per folder, kill -9 and resume, byte identity."""
from __future__ import annotations

import io
import json
import os
import re
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
    assert max(first["references"][0].size) == 64  # the longer side is rerender.size; the aspect is the crop's
    assert len(first["layout"]) == 64 and set(first["layout"]) <= set(range(first["num_subjects"] + 1))
    # Task runs grow with shards, not samples: 16 sources at shard size 8 = 2 shards per stage.
    assert result["task_runs"] == 9 * 2 + 1
    assert tiny_build["task_runs_by_stage"]["compose"] == 2


def test_rerun_does_no_work_execution_changes_rerun_nothing_and_threshold_change_reruns_publish(tiny_build, tmp_path, prefect_api):
    spec = copy_build(tiny_build, tmp_path)
    again = build(spec, tmp_path, "again")
    assert again["task_runs"] == 0 and again["model_loads"] == 0
    assert all(t["shards_skipped"] == t["shards"] for t in again["stages"])
    assert sum(task_runs_by_stage(prefect_api).values()) == 0

    # Smaller batches after an out-of-memory error change how the models run, not what they make.
    data = yaml.safe_load(spec.read_text())
    data["roles"]["t2i"]["batch_size"] = data["roles"]["editor"]["batch_size"] = 1
    spec.write_text(yaml.safe_dump(data))
    smaller = build(spec, tmp_path, "smaller")
    assert smaller["task_runs"] == 0 and sum(task_runs_by_stage(prefect_api).values()) == 0

    # near_duplicate_clip sits in the filter section, but only publish reads it.
    data["filter"]["near_duplicate_clip"] = 0.999
    spec.write_text(yaml.safe_dump(data))
    changed = build(spec, tmp_path, "changed")
    assert all(t["shards_skipped"] == t["shards"] for t in changed["stages"])
    assert changed["task_runs"] == 1 and task_runs_by_stage(prefect_api) == Counter({"publish": 1})
    card = (Path(changed["dataset"]) / "README.md").read_text()
    # As its shards ran (batch size 8, not 1), beside the zoo entry that made them.
    assert re.search(r"\| t2i \| diffusers \| `zoo:flux` \| zoo entry sha256 `[0-9a-f]{16}` \| batch_size 8, device auto, offload none \|", card)


def test_a_changed_read_reruns_its_readers_and_the_resumed_build_equals_a_fresh_one(tiny_build, tmp_path, prefect_api):
    """verify.min_subjects is read by detect (before verify): built with 4, changed to 2 and resumed,
    the build publishes what a fresh build with 2 (the session's) publishes."""
    spec = tiny_spec(tmp_path, "tiny", verify={"min_subjects": 4})
    strict = build(spec, tmp_path, "strict")
    data = yaml.safe_load(spec.read_text())
    data["verify"]["min_subjects"] = 2
    spec.write_text(yaml.safe_dump(data))
    # The resume runs while a second build of the same folder is tried: refused, it changes nothing.
    first = subprocess.Popen([sys.executable, "-m", "flows.cli", "build", str(spec), "--json", str(tmp_path / "resumed.json")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from tasks.engine.build_lock import lock_holder
    from tasks.stages import load_build_spec

    deadline = time.monotonic() + 120
    while not (holder := lock_holder(load_build_spec(spec))):
        assert first.poll() is None and time.monotonic() < deadline, "the resume ended before it could be raced"
        time.sleep(0.1)
    assert f"pid {first.pid}" in holder
    second = music("build", str(spec))
    assert second.returncode == 3 and f"pid {first.pid}" in second.stderr, second.stdout[-2000:] + second.stderr[-2000:]
    assert first.wait(timeout=1200) == 0
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert task_runs_by_stage(prefect_api) == Counter({s: 2 for s in ("detect", "verify", "rerender", "annotate", "layout",
                                                                      "decimate", "filter")} | {"publish": 1})
    assert strict["samples"] < resumed["samples"] == tiny_build["result"]["samples"]
    assert data_bytes(Path(resumed["dataset"])) == tiny_build["bytes"]


def test_a_stage_added_by_one_module_and_one_line_runs_with_its_section_threshold_and_score(tiny_build, tmp_path, prefect_api):
    """Adding a stage is its module plus one line in tasks.stages.STAGES: tests/stage_plugin.py (a
    sharpness score with its own spec section, threshold and published column) appended to this
    process's list, touching no project file. Its parameter is validated in the spec, it alone runs
    (then publish), drops what its threshold cuts, and its score is in the published data, the card
    and `music calibrate`'s report."""
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from stage_plugin import sharpness

    published = [row for path in sorted((tiny_build["dir"] / "dataset" / "data").glob("*.parquet"))
                 for row in pq.read_table(path).to_pylist()]
    values = {row["id"]: sharpness(Image.open(io.BytesIO(row["image"]["bytes"]))) for row in published}
    threshold = sorted(set(values.values()))[len(set(values.values())) // 2]  # the median source: about half drop
    spec = copy_build(tiny_build, tmp_path)
    spec.write_text(yaml.safe_dump(yaml.safe_load(spec.read_text()) | {"sharpness": {"min_sharpness": threshold}}))
    out = tmp_path / "plugin.json"
    script = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import stage_plugin
from tasks.stages import STAGES, load_build_spec, parse_build_spec
STAGES.append(stage_plugin.STAGE)
from data_specs.roles import SpecError
try:
    parse_build_spec({{**load_build_spec({str(spec)!r}).model_dump(), "sharpness": {{"min_sharpness": -1}}}})
except SpecError as error:
    invalid = str(error)
from flows.build import build_training_set
from tasks.checks.calibrate import calibration_report
result = build_training_set({str(spec)!r})
report = calibration_report(load_build_spec({str(spec)!r}))
open({str(out)!r}, "w").write(json.dumps({{"invalid": invalid, "result": result, "thresholds": report["thresholds"]}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    facts = json.loads(out.read_text())
    assert "sharpness.min_sharpness" in facts["invalid"] and "greater than or equal to 0" in facts["invalid"], facts["invalid"]
    result = facts["result"]
    assert [t["stage"] for t in result["stages"]][-2:] == ["filter", "sharpness"]
    assert task_runs_by_stage(prefect_api) == Counter({"sharpness": 2, "publish": 1})  # the stages before it are reused
    rows = {row["id"]: row for path in sorted((Path(result["dataset"]) / "data").glob("*.parquet"))
            for row in pq.read_table(path).to_pylist()}
    kept = {i for i, value in values.items() if value >= threshold}
    assert set(rows) == kept and 0 < len(kept) < len(values)
    funnel = {f["stage"]: f for f in result["funnel"]}
    assert funnel["sharpness"]["dropped"] == {"too_soft": len(values) - len(kept)}
    before = {row["id"]: row for row in published}
    # near_duplicate_clip looks at the earlier published sources, which the dropped ones no longer are
    moved = ("sharpness", "content_hash", "near_duplicate_clip")
    for sample_id, row in rows.items():
        assert row["sharpness"] == pytest.approx(values[sample_id], abs=1e-6)
        assert {k: v for k, v in row.items() if k not in moved} == {k: v for k, v in before[sample_id].items() if k not in moved}
    card = (Path(result["dataset"]) / "README.md").read_text()
    assert f"| `sharpness` | sample | mean absolute Laplacian of the target (sharpness) | 0 to 1 | >= `sharpness.min_sharpness` {threshold} |" in card
    calibrated = {row["threshold"]: row for row in facts["thresholds"]}["sharpness.min_sharpness"]
    assert (calibrated["stage"], calibrated["value"], calibrated["count"]) == ("sharpness", threshold, len(values))
    assert calibrated["dropped"] == round((len(values) - len(kept)) / len(values), 4)


def test_a_damaged_part_is_redone_on_resume_not_published(tiny_build, tmp_path, prefect_api):
    """A filter part cut to half its size (a full disk, a bad copy) under its marker, the dataset gone:
    the resume names the part in one line, redoes that shard alone and makes the same bytes current."""
    import shutil

    spec = copy_build(tiny_build, tmp_path)
    build_folder = tmp_path / "out" / "tiny"
    part = next(build_folder.glob("stages/filter/*/part-00001.parquet"))
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    shutil.rmtree(build_folder / "dataset")
    done = music("build", str(spec), "--json", str(tmp_path / "resumed.json"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logged = [line for line in (done.stdout + done.stderr).splitlines() if "redoing filter shard 1" in line]
    assert len(logged) == 1 and "part-00001.parquet is" in logged[0] and "its marker says" in logged[0], logged
    assert "Traceback" not in done.stdout + done.stderr
    # The redone shard has its old bytes, so the publish fingerprint is unchanged and release v1 already
    # holds that publication: it becomes `dataset/` again (as after a rollback) without a publish run.
    assert task_runs_by_stage(prefect_api) == Counter({"filter": 1})
    assert data_bytes(build_folder / "dataset") == tiny_build["bytes"]


def test_clean_frees_what_a_parameter_change_left_and_the_build_still_resumes(tiny_build, tmp_path, prefect_api):
    """A wider rerender crop reruns rerender and what follows: `music clean` lists the old
    fingerprints and the references no current shard names, removes them with --yes, and the build
    then resumes with no task run to the same bytes."""
    spec = copy_build(tiny_build, tmp_path)
    root = tmp_path / "out" / "tiny"
    assert "would free 0 bytes" in music("clean", str(spec)).stdout
    data = yaml.safe_load(spec.read_text())
    data["rerender"] = {**data.get("rerender", {}), "crop_margin": 0.2}
    spec.write_text(yaml.safe_dump(data))
    changed = build(spec, tmp_path, "changed")
    listed = music("clean", str(spec))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    stale = [line.split()[0] for line in listed.stdout.splitlines() if line.startswith("  stages/")]
    assert sorted(p.split("/")[1] for p in stale) == ["annotate", "decimate", "filter", "layout", "publish", "rerender"]
    unreferenced = int(listed.stdout.split("images no current shard names: ")[1].split(",")[0])
    assert unreferenced > 0  # the old references
    total = int(listed.stdout.split("would free ")[1].split(" bytes")[0].replace(",", ""))
    done = music("clean", str(spec), "--yes")
    assert done.returncode == 0 and f"freed {total:,} bytes" in done.stdout, done.stdout + done.stderr
    assert not any((root / p).exists() for p in stale)
    again = build(spec, tmp_path, "again")
    assert again["task_runs"] == 0 and data_bytes(Path(again["dataset"])) == data_bytes(Path(changed["dataset"]))
    assert "would free 0 bytes" in music("clean", str(spec)).stdout


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
    # A second build of the spec and folder is refused at once, naming the running one.
    started = time.monotonic()
    second = music("build", str(spec))
    assert second.returncode == 3 and time.monotonic() - started < 30, second.stdout[-2000:] + second.stderr[-2000:]
    refusal = second.stderr.strip().splitlines()
    assert len(refusal) == 1 and "being built by another run" in refusal[0] and f"pid {process.pid}" in refusal[0], refusal
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    from tasks.engine.build_lock import lock_holder
    from tasks.stages import load_build_spec

    assert lock_holder(load_build_spec(spec)) is None  # the kernel freed the dead holder's lock
    assert not (tmp_path / "out" / "tiny" / "dataset").exists()
    resumed = build(spec, tmp_path, "resumed")
    assert resumed["stages"][0]["shards_skipped"] == 2  # compose was done before the kill
    assert data_bytes(Path(resumed["dataset"])) == first_bytes
    ids = [i for p in sorted((Path(resumed["dataset"]) / "data").glob("*.parquet")) for i in pq.read_table(p).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == resumed["samples"] == first["samples"]


def test_each_stage_holds_only_its_own_models(tiny_build):
    """Residency is stage-scoped: while a model stage runs only its roles are loaded; a model the
    next model stage shares (clip: layout, then filter) stays and is not loaded again."""
    from tasks.engine.contract import declares
    from tasks.stages import STAGES

    result, stages = tiny_build["result"], tiny_build["dir"] / "stages"
    for stage in STAGES:
        markers = [json.loads(p.read_text()) for p in stages.glob(f"{stage.name}/*/*.done.json")]
        assert markers and (not stage.roles or all(m["resident"] == sorted(stage.roles) for m in markers)), \
            (stage.name, [m["resident"] for m in markers])
        # and, through the flow too, every spec field it read is one it declares
        assert all(m["reads"] and all(declares(stage.reads, r) for r in m["reads"])
                   for m in markers), (stage.name, [m["reads"] for m in markers])
    loads = {t["stage"]: t["model_loads"] for t in result["stages"]}
    # One load per model a stage declares, except filter's clip (kept from layout); the vlm of
    # verify is freed during rerender (the editor's stage) and loaded again for annotate.
    assert loads == {"compose": 1, "synthesize": 1, "detect": 1, "verify": 1, "rerender": 2, "annotate": 1,
                     "layout": 2, "decimate": 0, "filter": 0}
    assert result["model_loads"] == 9
