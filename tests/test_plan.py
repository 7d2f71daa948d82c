"""`music plan`: shards, task runs, the funnel's expected samples, weight memory per stage from
meta-device architectures and safetensors headers, GPU-hours from a benchmark result; no model loads."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tasks.checks.cost_plan import PlanError, Rates, format_plan, funnel, measured_rates, plan, project_hours, read_bench
from tasks.stages import load_build_spec, parse_build_spec

ROOT = Path(__file__).resolve().parents[1]
HELPER_ROLES = {"detector", "segmenter", "clip", "dino"}


def spec_with(**changes):
    base = load_build_spec("tiny.yaml").model_dump()
    return parse_build_spec({**base, **changes})


@pytest.mark.slow
def test_music_10k_plan_loads_no_model(tmp_path):
    """The plan of ~65 GB of checkpoints runs offline in a small process: sizes come from the meta device."""
    out = tmp_path / "plan.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MUSIC_HOME": str(tmp_path / "home")}
    command = ("import resource; from flows.cli.main import app; "
               f"app(['plan', 'data_specs/music_10k.yaml', '--json', {str(out)!r}], standalone_mode=False); "
               "print('max_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    peak_rss = int(done.stdout.split("max_rss_kib")[-1]) * 1024
    # torch + transformers + diffusers imports take ~1-3.5 GiB; the smallest materialised stage (DINO
    # aside) would add 15 GiB (Qwen3-8B in bf16), the whole spec ~65 GB.
    assert peak_rss < 8 * 2**30, f"plan used {peak_rss / 2**30:.1f} GiB: weights were materialised"
    assert not (tmp_path / "home" / "zoo").exists()  # neither zoo entries nor arch folders were built
    result = json.loads(out.read_text())
    assert (result["shards"], result["task_runs"]) == (125, 9 * 125 + 1)  # at the ceiling of 8,000 sources
    upper = result["upper_bound"]
    # {2: 3, 3: 3, 4: 3, 5: 2, 6: 2, 7..12: 1}: a source with n subjects gives n - 1 samples
    assert upper["samples"] == pytest.approx(8000 * 87 / 19)
    assert upper["published"] == 10000  # the target
    # wave 1: the target at the no-drop yield, in whole shards of 64
    assert result["target"]["first_wave"] == -(-math.ceil(10000 / (87 / 19)) // 64) * 64 == 2240
    by_stage = {row["stage"]: row for row in result["models"]}
    from music_model.zoo.arch import param_bytes

    assert by_stage["synthesize"]["peak_bytes"] == param_bytes("flux_dev", torch.bfloat16)
    assert by_stage["rerender"]["peak_bytes"] == param_bytes("flux_kontext_dev", torch.bfloat16) + param_bytes("dino_vits16", torch.float32)
    helpers = [m for row in result["models"] for m in row["models"] if m["role"] in HELPER_ROLES]
    assert {m["role"] for m in helpers} == HELPER_ROLES and {m["dtype"] for m in helpers} == {"float32"}
    assert by_stage["decimate"]["models"] == []
    assert all("on meta" in m["source"] for row in result["models"] for m in row["models"])
    assert "synthesize peak 31.42 GiB" in done.stdout and "capped at 10000: 10000 published" in done.stdout


def test_tiny_plan_reads_sizes_from_safetensors_headers():
    from safetensors import safe_open

    from music_model.zoo import ensure_entry

    spec = load_build_spec("tiny.yaml")
    folders = {name: ensure_entry(role.model.removeprefix("zoo:")) for name, role in spec.roles.items()}
    result = plan(spec)
    assert (result["shards"], result["task_runs"]) == (2, 19)
    for row in result["models"]:
        for model in row["models"]:
            count = 0
            for path in folders[model["role"]].rglob("*.safetensors"):
                with safe_open(str(path), "pt") as handle:
                    count += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
            # Helper roles are float32 in every shipped spec; the rest are `auto`, bfloat16 on a GPU.
            dtype, size = ("float32", 4) if model["role"] in HELPER_ROLES else ("bfloat16", 2)
            assert (model["parameters"], model["bytes"], model["dtype"]) == (count, size * count, dtype), model
    # 16 sources of 2, 3 or 4 subjects (equal weights): 1, 2 or 3 samples each
    assert result["upper_bound"]["samples"] == pytest.approx(32)
    assert "decimate   CPU only" in format_plan(result)


def test_every_shipped_spec_runs_the_helper_roles_in_float32():
    """bfloat16 moves GroundingDINO's boxes by pixels and the CLIP/DINO scores by ~1e-3, the size of
    the thresholds' margins; the plan prints each model's dtype."""
    specs = sorted((ROOT / "data_specs").glob("*.yaml"))
    checked = 0
    for path in specs:
        roles = yaml.safe_load(path.read_text()).get("roles") or {}
        for name, role in roles.items():
            if name in HELPER_ROLES or role.get("role") in HELPER_ROLES:
                assert role.get("dtype") == "float32", f"{path.name}: roles.{name}"
                checked += 1
    assert checked >= 20
    text = format_plan(plan(load_build_spec("tiny.yaml")))
    for role in HELPER_ROLES:
        assert re.search(rf"^ +{role} +\S+ +float32 ", text, re.M), role


def test_unknown_hub_model_and_unbuilt_zoo_are_reported_not_guessed(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSIC_ZOO_DIR", str(tmp_path / "empty-zoo"))
    roles = load_build_spec("tiny.yaml").model_dump()["roles"]
    roles["dino"] = {**roles["dino"], "model": "someone/unknown-vit"}
    result = plan(spec_with(roles=roles))
    rerender = next(row for row in result["models"] if row["stage"] == "rerender")
    assert rerender["peak_bytes"] is None
    assert [m["source"] for m in rerender["models"]] == ["zoo entry not built (music zoo build): size unknown",
                                                         "hub model with no arch entry: size unknown"]


def test_funnel_thins_subjects_and_drops_sources_below_the_minimum():
    spec = spec_with(num_source_images=100, subject_counts={3: 1})
    rates = Rates(row_keep={"compose": 0.8}, subject_keep={"detect": 0.5})
    expected = funnel(spec, rates)
    stages = {s["stage"]: s for s in expected["stages"]}
    assert stages["compose"]["rows_out"] == pytest.approx(80)
    # Bin(3, 0.5): 3/8 keep 2 subjects, 1/8 keep 3, the rest fall under verify.min_subjects = 2
    assert stages["detect"]["rows_out"] == pytest.approx(80 * 4 / 8)
    assert stages["verify"]["subjects_in"] == pytest.approx(80 * (3 / 8 * 2 + 1 / 8 * 3))
    assert stages["decimate"]["rows_out"] == pytest.approx(80 * (3 / 8 * 1 + 1 / 8 * 2))
    assert stages["filter"]["units"] == pytest.approx(40)  # one CLIP embedding per source
    assert expected["samples"] == pytest.approx(50)


def test_funnel_caps_and_reports_the_sources_a_cap_needs():
    capped = funnel(spec_with(num_source_images=30, subject_counts={4: 1}, publish={"rows_per_file": 16, "max_samples": 50}))
    assert (capped["samples"], capped["published"]) == (90, 50)
    short = funnel(spec_with(num_source_images=10, subject_counts={4: 1}, publish={"rows_per_file": 16, "max_samples": 50}))
    assert (short["published"], short["sources_for_cap"]) == (30, 17)
    # down to single subjects (the MSIC build): n subjects give n samples
    msic = funnel(spec_with(subject_counts={3: 1}, verify={"min_subjects": 1}, decimate={"min_subjects": 1},
                            filter={"min_subjects": 1, "max_subjects": 12, "near_duplicate_clip": 1.0001}))
    assert msic["samples"] == pytest.approx(16 * 3)


def bench_result(path: Path, **changes) -> Path:
    stages = []
    for stage, unit in (("compose", "rows"), ("synthesize", "rows"), ("detect", "rows"), ("verify", "subjects"),
                        ("rerender", "subjects"), ("annotate", "rows"), ("layout", "subjects"), ("decimate", "rows"),
                        ("filter", "sources")):
        stages.append({"stage": stage, "unit": unit, "units": 4, "rows_in": 4, "rows_out": 4, "subject_keep": 1.0,
                       "seconds": 10.0, "load_seconds": 2.0, **changes.get(stage, {})})
    path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "stages": stages, "publish": {"rows_in": 8, "near_duplicate": 2}}))
    return path


def test_bench_result_gives_keep_rates_and_gpu_hours(tmp_path):
    bench = read_bench(bench_result(tmp_path / "bench.json", compose={"rows_out": 3}, verify={"subject_keep": 0.75}))
    rates = measured_rates(bench)
    assert rates.row_keep["compose"] == 0.75 and rates.subject_keep["verify"] == 0.75 and rates.near_duplicate_keep == 0.75
    assert "verify" not in rates.row_keep  # without its input's subject counts, drops follow the thinning model alone
    spec = spec_with(num_source_images=6000, subject_counts={2: 1})
    expected = funnel(spec, rates)
    hours = {row["stage"]: row for row in project_hours(expected, bench)}
    assert "decimate" not in hours  # a CPU stage
    # 6000 sources at 2 s a row (8 s of compute for 4 rows), plus one 2 s load
    assert hours["compose"]["hours"] == pytest.approx((6000 * 2.0 + 2.0) / 3600)
    assert hours["verify"]["units"] == pytest.approx(4500 * 2)  # rows after compose x 2 subjects
    result = plan(spec, bench)
    assert result["gpu_hours"] == pytest.approx(sum(row["hours"] for row in hours.values()))
    text = format_plan(result)
    assert "projected GPU-hours on NVIDIA H100 80GB HBM3" in text and f"total {result['gpu_hours']:.1f} GPU-hours" in text
    # One more wave of a target build: 8 stages' 2 s loads, in sources at the projected seconds per source.
    cost = result["wave_cost"]
    per_source = sum(row["hours"] * 3600 - 2.0 for row in hours.values()) / 6000
    assert cost["load_seconds"] == 16.0 and cost["sources"] == pytest.approx(16.0 / per_source)
    assert f"one wave's model loads: 16.0 s = {cost['sources']:.1f} sources' worth of GPU work" in text


def test_bad_bench_result_names_the_problem(tmp_path):
    bench = json.loads(bench_result(tmp_path / "bench.json").read_text())
    bench["stages"] = [s for s in bench["stages"] if s["stage"] != "layout"]
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    with pytest.raises(PlanError, match="no record of stage 'layout'"):
        read_bench(tmp_path / "bench.json")
    done = subprocess.run([sys.executable, "-m", "flows.cli", "plan", "tiny.yaml", "--bench", str(tmp_path / "missing.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "missing.json: benchmark result not found" in done.stderr


def test_subject_stage_drops_the_thinning_model_misses_are_scaled_in(tmp_path):
    """detect kept both subjects of the 2 rows it kept, but dropped 2 of 4 rows: survival measured on
    kept rows says 1.0, so the stage's row keep carries the measured loss."""
    detect = {"rows_out": 2, "subject_keep": 1.0, "subject_counts_in": {"2": 4}, "min_subjects": 2}
    rates = measured_rates(read_bench(bench_result(tmp_path / "bench.json", detect=detect)))
    assert rates.subject_keep["detect"] == 1.0 and rates.row_keep["detect"] == 0.5
    expected = funnel(spec_with(num_source_images=100, subject_counts={2: 1}), rates)
    assert next(s for s in expected["stages"] if s["stage"] == "detect")["rows_out"] == 50


def test_disk_counts_each_image_once_in_the_build_and_every_embedding_in_the_published_set():
    from tasks.checks.cost_plan import PNG_BYTES_PER_PIXEL, disk

    spec = load_build_spec("data_specs/music_10k.yaml")
    expected = funnel(spec)
    space = disk(spec, expected)
    by_stage = {row["stage"]: row for row in space["stages"]}
    assert by_stage["synthesize"]["images_bytes"] == pytest.approx(8000 * 1024 * 1024 * PNG_BYTES_PER_PIXEL)
    # a reference per subject rerender keeps; decimated siblings add rows, never images
    subjects = {s["stage"]: s["subjects_in"] for s in expected["stages"]}
    assert by_stage["rerender"]["images_bytes"] == pytest.approx(subjects["annotate"] * 512 * 512 * PNG_BYTES_PER_PIXEL)
    assert by_stage["decimate"]["images_bytes"] == by_stage["filter"]["images_bytes"] == 0
    assert space["published_bytes"] > space["intermediate_bytes"] and space["ratio"] < 1
