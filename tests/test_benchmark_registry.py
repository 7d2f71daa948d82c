"""A benchmark added by one module and one registry line is scored by the same `evaluate` flow that
`music eval` runs, on the session's Prefect server: one task run per shard, one row per image, the
aggregate the mean of the rows, and a rerun that reuses every shard. The line is added in a child
process (tests/benchmark_plugin.py is the module), so the project's registry stays as shipped."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from test_evaluate_flow import artifact_keys, tiny_spec

pytestmark = pytest.mark.prefect

TESTS = Path(__file__).resolve().parent
LEVELS = [0, 51, 102, 153, 255]  # one flat grey image each: its mean brightness is level / 255

CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from tasks.evaluate import registry
registry.MODULES.append("benchmark_plugin")  # the one line a new benchmark adds to tasks/evaluate/registry.py
from flows.evaluate import evaluate

spec_json, images, out = sys.argv[1:]
runs = [evaluate(spec_json, "brightness", images=images) for _ in range(2)]
open(out, "w").write(json.dumps(runs))
"""


def test_a_registered_plugin_benchmark_is_scored_by_the_evaluate_flow(tmp_path, prefect_api):
    from tasks.evaluate import registry

    images = tmp_path / "images"
    images.mkdir()
    for k, level in enumerate(LEVELS):
        Image.new("RGB", (32, 24), (level, level, level)).save(images / f"{k}.png")
    spec_json, _ = tiny_spec(tmp_path, "bright", shard_size=2)
    done = subprocess.run([sys.executable, "-c", CHILD.format(tests=str(TESTS)), spec_json, str(images), str(tmp_path / "runs.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first, again = json.loads((tmp_path / "runs.json").read_text())

    assert first["benchmark"] == "brightness" and first["images_scored"] == len(LEVELS) and first["task_runs"] == 3
    out = Path(first["output"])
    rows = pq.read_table(out / "scores" / "images.parquet").to_pylist()
    assert {Path(r["path"]).name: r["brightness"] for r in rows} == pytest.approx({f"{k}.png": v / 255 for k, v in enumerate(LEVELS)})
    assert first["scores"]["brightness"] == pytest.approx(sum(r["brightness"] for r in rows) / len(rows))
    assert json.loads((out / "summary.json").read_text())["scores"] == first["scores"] and "mean brightness" in (out / "report.md").read_text()
    assert [len(list(folder.glob("*.done.json"))) for folder in (out / "shards").iterdir()] == [3]  # one fingerprint, 3 markers
    assert {"eval-bright-images", "eval-bright-report"} <= artifact_keys(prefect_api, "eval-bright-%")

    assert again["task_runs"] == 0 and all(shard["skipped"] for shard in again["shards"]) and again["scores"] == first["scores"]

    # The child's line never reached this process's registry, nor the file.
    assert list(registry.benchmarks()) == ["msic", "dreambench"]
    with pytest.raises(ValueError, match="benchmark must be one of msic, dreambench, got 'brightness'"):
        registry.benchmark("brightness")
