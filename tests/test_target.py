"""Builds to a target against a real Prefect server: exactly the target published with its mix;
a raised target runs only new shards and equals a fresh build of it; a raised ceiling reruns
nothing; a target the ceiling cannot reach publishes what there is and says why in one line."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_build import build, data_bytes, music, tiny_spec

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

MIX = {2: 0.6, 3: 0.4}


def target_spec(root: Path, samples: int, ceiling: int = 48) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return tiny_spec(root, "target", num_source_images=ceiling, shard_size=4, target={"samples": samples, "mix": MIX})


def published_counts(result: dict) -> Counter:
    data = Path(result["dataset"]) / "data"
    return Counter(n for p in sorted(data.glob("*.parquet")) for n in pq.read_table(p, columns=["num_subjects"]).column(0).to_pylist())


def test_a_build_to_a_target_publishes_exactly_it_and_grows_by_new_shards_only(tmp_path, prefect_api):
    first = build(target_spec(tmp_path / "a", 10), tmp_path, "a")
    assert first["samples"] == 10 and published_counts(first) == {2: 6, 3: 4}
    assert first["waves"] == sorted(set(first["waves"])) and all(w % 4 == 0 for w in first["waves"])
    report = (Path(first["dataset"]) / "report.md").read_text()
    assert f"sources made {first['waves'][-1]} in {len(first['waves'])} waves" in report
    assert "model-seconds per published sample" in report and first["model_seconds_per_sample"]["all"] > 0
    assert "built to a target of 10 samples" in (Path(first["dataset"]) / "README.md").read_text()
    stats = json.loads((Path(first["dataset"]) / "stats.json").read_text())
    dropped = pq.read_table(next((tmp_path / "a" / "out" / "target" / "stages" / "publish").glob("*/dropped.parquet"))).to_pylist()
    assert {d["reason"] for d in dropped} <= {"over_target", "near_duplicate"}
    assert stats["funnel"][-1]["rows_out"] == 10

    # Raising the target on the finished build: only shards past its sources run.
    shutil.copytree(tmp_path / "a", tmp_path / "raised")
    raised_spec = target_spec(tmp_path / "raised", 14)
    raised = build(raised_spec, tmp_path, "raised")
    old, now = first["waves"][-1] // 4, raised["waves"][-1] // 4
    assert raised["samples"] == 14 and published_counts(raised) == {2: 8, 3: 6}
    assert raised["task_runs"] == 9 * max(0, now - old) + 1
    assert all(t["shards_skipped"] == min(old, now) for t in raised["stages"])

    fresh = build(target_spec(tmp_path / "fresh", 14), tmp_path, "fresh")
    assert fresh["waves"] == raised["waves"]
    assert data_bytes(Path(fresh["dataset"])) == data_bytes(Path(raised["dataset"]))

    # Raising the ceiling alone: the target is met, so nothing reruns.
    again = build(target_spec(tmp_path / "raised", 14, ceiling=96), tmp_path, "ceiling")
    assert again["task_runs"] == 0 and again["waves"] == raised["waves"]

    # A target the ceiling cannot reach: the build completes, publishes what it has, says why.
    made = raised["waves"][-1]
    done = music("build", str(target_spec(tmp_path / "raised", 500, ceiling=made)), "--json", str(tmp_path / "short.json"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    short = json.loads((tmp_path / "short.json").read_text())
    lines = [line for line in done.stdout.splitlines() if line.startswith("Short: ")]
    assert len(lines) == 1 and f"the ceiling of {made} sources (num_source_images) was reached" in lines[0]
    assert "raise num_source_images to about" in lines[0] and short["task_runs"] == 1  # publish only
    assert short["samples"] == sum(published_counts(short).values()) >= 14
