"""benchmarks/gpu_pipeline.py --tiny: the real-size GPU benchmark's code on the CPU with the tiny
arch variants, so it never rots; its result feeds `music plan --bench`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.checks.cost_plan import read_bench
from tasks.stages import STAGES, stage_named

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_run_measures_every_stage_and_feeds_the_plan(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_pipeline.py", "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    bench = json.loads(out.read_text())
    assert (bench["device"], bench["dtype"], bench["sources"], bench["subjects"]) == ("cpu", "float32", 2, 3)
    # On a GPU machine one row per visible GPU; here the CPU slot, through the same code.
    assert [(row["device"], row["mask_backend"], row["ok"]) for row in bench["device_check"]] == [("cpu", "auto", True)]
    assert "device check cpu     mask ok (auto): ok" in done.stdout
    stages = {record["stage"]: record for record in bench["stages"]}
    assert list(stages) == [stage.name for stage in STAGES]
    for name, record in stages.items():
        assert record["unit"] == stage_named(name).unit and record["units"] > 0 and record["items_per_s"] > 0, record
        assert record["peak_bytes"] is None  # no accelerator on the CPU
    assert stages["compose"]["units"] == 2
    # every model call is measured beside the same model in a plain loop on the same inputs
    calls = {(c["role"], c["method"]) for record in bench["stages"] for c in record["calls"]}
    assert calls == {("llm", "generate"), ("t2i", "generate"), ("detector", "detect"), ("vlm", "generate"), ("vlm", "yes_probability"), ("editor", "edit"),
                     ("dino", "embed_images"), ("segmenter", "segment"), ("clip", "embed_texts"), ("clip", "embed_images")}
    for record in bench["stages"]:
        for call in record["calls"]:
            assert call["plain_items"] == call["items"] and call["ratio"] > 0, call  # one batch covers the tiny build
            assert call["plain_tokens"] > 0 if call["method"] == "generate" and call["role"] in ("llm", "vlm") else True
    loads = [record["load_seconds"] for record in bench["stages"] if record["calls"]]
    assert loads[0] > 0 and all(seconds >= 0 for seconds in loads)
    # FLUX figures from the t2i and editor calls at the tiny spec's sizes and steps
    assert [(row["stage"], row["steps"]) for row in bench["diffusion"]] == [("synthesize", 2), ("rerender", 2)]
    assert bench["diffusion"][0]["sizes"] == ["128x128"] and bench["diffusion"][0]["seconds_per_image"] > 0
    assert bench["publish"]["rows_out"] > 0
    assert bench["projection"]["spec"] == "music_10k.yaml" and bench["projection"]["gpu_hours"] > 0
    assert "music_10k on cpu" in done.stdout and "ratio" in done.stdout

    read_bench(out)  # the plan's reader accepts it
    plan = subprocess.run([sys.executable, "-m", "flows.cli", "plan", "data_specs/music_10k.yaml", "--bench", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "projected GPU-hours on cpu" in plan.stdout
    assert f"total {bench['projection']['gpu_hours']:.1f} GPU-hours" in plan.stdout
