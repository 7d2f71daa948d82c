"""MSIC regeneration against a real Prefect server: identical manifests from one spec, a changed
seed in the diff, the overlap check on a clean pair and on a planted overlap."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from data_specs import shipped

pytestmark = pytest.mark.prefect


def music(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=1200)


def spec_file(tmp: Path, source: str, out: str, **changes) -> Path:
    data = yaml.safe_load(shipped(source).read_text())
    data["output_root"] = str(tmp / out)
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    path = tmp / f"{out}-{source}"
    path.write_text(yaml.safe_dump(data))
    return path


def run_ok(*args: str) -> str:
    done = music(*args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def builds(tmp_path_factory, prefect_api):
    tmp = tmp_path_factory.mktemp("msic")
    run_ok("build", str(spec_file(tmp, "tiny.yaml", "train")))
    training = tmp / "train" / "tiny" / "dataset"
    first = spec_file(tmp, "msic_tiny.yaml", "a", msic={"training_dataset": str(training)})
    run_ok("msic", "build", str(first))
    run_ok("msic", "build", str(spec_file(tmp, "msic_tiny.yaml", "b", msic={"training_dataset": str(training)})))
    run_ok("msic", "build", str(spec_file(tmp, "msic_tiny.yaml", "c", seed=8)))
    return tmp, training, {k: tmp / k / "msic_tiny" / "msic" for k in "abc"}


def test_same_spec_gives_identical_manifests_and_cases(builds):
    _, _, msic = builds
    a, b = (json.loads((msic[k] / "manifest.json").read_text()) for k in "ab")
    assert a == b and a["cases"]
    assert set(a["counts"]) == {str(k) for k in range(1, 13)}
    assert sum(a["counts"].values()) == len(a["cases"])
    cases = pq.read_table(msic["a"] / "data" / "test-00000-of-00001.parquet").to_pylist()
    for case in cases:
        assert len(case["references"]) == len(case["categories"]) == case["subject_count"]
        assert "<s" not in case["prompt"]  # CLIP-T prompt names categories, not tags
    assert "identical" in run_ok("msic", "diff", str(msic["a"]), str(msic["b"]))


def test_changed_seed_shows_in_diff(builds):
    _, _, msic = builds
    out = run_ok("msic", "diff", str(msic["a"]), str(msic["c"]))
    a = json.loads((msic["a"] / "manifest.json").read_text())
    assert f"removed: {len(a['cases'])}" in out
    assert "added: 0" not in out


def test_overlap_check_passes_clean_pair_and_catches_planted_overlap(builds):
    tmp, training, msic = builds
    assert "no overlap" in run_ok("msic", "check-overlap", str(msic["a"]), str(training))
    planted = tmp / "planted"
    shutil.copytree(training, planted)
    case = pq.read_table(msic["a"] / "data" / "test-00000-of-00001.parquet").to_pylist()[0]
    data_file = sorted((planted / "data").glob("*.parquet"))[0]
    table = pq.read_table(data_file)
    rows = table.to_pylist()
    rows[0]["references"][0] = case["references"][0]  # a benchmark reference image leaked into training
    pq.write_table(table.from_pylist(rows, schema=table.schema), data_file)
    done = music("msic", "check-overlap", str(msic["a"]), str(planted))
    assert done.returncode == 1
    assert f"{case['case_id']}: reference" in done.stderr and rows[0]["id"] in done.stderr
