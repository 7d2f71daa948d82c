"""MSIC regeneration against a real Prefect server: identical manifests from one spec, a changed
seed in the diff, the overlap check on a clean pair and on a planted overlap, and `msic build`
failing on that overlap."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
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
def builds(tmp_path_factory, tiny_build, msic_build):
    """a: the session's MSIC build resumed in a copy, now checked against the session's training
    set; b: the same spec built from scratch; c: another seed."""
    tmp = tmp_path_factory.mktemp("msic")
    training = tiny_build["dir"] / "dataset"
    shutil.copytree(msic_build["dir"], tmp / "a" / msic_build["dir"].name)
    first = spec_file(tmp, "msic_tiny.yaml", "a", msic={"training_dataset": str(training)})
    run_ok("msic", "build", str(first))
    run_ok("msic", "build", str(spec_file(tmp, "msic_tiny.yaml", "b", msic={"training_dataset": str(training)})))
    run_ok("msic", "build", str(spec_file(tmp, "msic_tiny.yaml", "c", seed=8)))
    return tmp, training, {k: tmp / k / "msic_tiny" / "msic" for k in "abc"}


def test_same_spec_gives_identical_manifests_and_cases(builds):
    _, _, msic = builds
    a, b = (json.loads((msic[k] / "manifest.json").read_text()) for k in "ab")
    assert a == b and a["cases"]
    cases = pq.read_table(msic["a"] / "data" / "test-00000-of-00001.parquet").to_pylist()
    from tasks.publishing.msic import case_hash

    # The manifest describes the published file: its cases with their content hashes, its counts.
    assert a["cases"] == {case["case_id"]: case_hash(case) for case in cases}
    assert Counter(case["subject_count"] for case in cases) == {int(k): v for k, v in a["counts"].items() if v}
    # msic_tiny: cases_per_stratum 2 in each stratum 1..12, or all the build made of that count
    made = Counter(r["num_subjects"] for p in (msic["a"].parent / "stages" / "filter").glob("*/part-*[0-9].parquet")
                   for r in pq.read_table(p, columns=["num_subjects"]).to_pylist())
    assert a["counts"] == {str(k): min(2, made[k]) for k in range(1, 13)}
    assert sum(a["counts"].values()) >= 20, a["counts"]
    for case in cases:
        assert len(case["references"]) == len(case["categories"]) == case["subject_count"]
        assert "<s" not in case["prompt"]  # CLIP-T prompt names categories, not tags
    assert "identical" in run_ok("msic", "diff", str(msic["a"]), str(msic["b"]))


def test_an_unchanged_rerun_runs_no_task_and_no_contamination_scan(builds, prefect_api):
    from test_build import task_runs_by_stage

    tmp, _, msic = builds
    manifest = msic["a"] / "manifest.json"
    written = manifest.stat().st_mtime_ns
    run_ok("msic", "build", str(tmp / "a-msic_tiny.yaml"), "--json", str(tmp / "again.json"))
    again = json.loads((tmp / "again.json").read_text())
    assert again["task_runs"] == 0 and again["skipped"] and sum(task_runs_by_stage(prefect_api).values()) == 0
    assert manifest.stat().st_mtime_ns == written  # nothing was published again, no overlap scanned
    assert again["contamination"]["exact"] == 0 and again["counts"] == json.loads(manifest.read_text())["counts"]
    # Its near-duplicate drops are kept with their reason, as every stage's are (tiny: a threshold above 1, none).
    dropped = list((msic["a"].parent / "stages" / "publish-msic").glob("*/dropped.parquet"))
    assert dropped and pq.read_schema(dropped[0]).names == ["id", "index", "stage", "reason", "detail"]


def test_changed_seed_shows_in_diff(builds):
    _, _, msic = builds
    out = run_ok("msic", "diff", str(msic["a"]), str(msic["c"]))
    a = json.loads((msic["a"] / "manifest.json").read_text())
    assert f"removed: {len(a['cases'])}" in out
    assert "added: 0" not in out


def test_overlap_check_and_msic_build_catch_a_planted_overlap(builds):
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

    # A rebuild checked against the leaky training set fails, naming the item, and publishes nothing.
    manifest = (msic["a"] / "manifest.json").read_bytes()
    leaky = spec_file(tmp, "msic_tiny.yaml", "a", msic={"training_dataset": str(planted)})
    done = music("msic", "build", str(leaky))
    assert done.returncode != 0 and "Published" not in done.stdout
    assert "overlap the training set" in done.stderr and f"{case['case_id']}: reference" in done.stderr, done.stderr[-3000:]
    assert (msic["a"] / "manifest.json").read_bytes() == manifest


def _replace_reference(data_file: Path, row: int, reference: int, struct: dict) -> dict:
    """Rewrite one image of a Parquet file in place; the row as it is now."""
    table = pq.read_table(data_file)
    rows = table.to_pylist()
    rows[row]["references"][reference] = struct
    pq.write_table(table.from_pylist(rows, schema=table.schema), data_file)
    return rows[row]


def test_near_duplicate_check_catches_a_reencoded_training_reference(builds, tmp_path):
    """A benchmark reference that reached the training set re-encoded (JPEG q80) and resized has
    other bytes, so only the embedding check finds it: named with its case, the training sample and
    both similarities. The clean pair passes."""
    import io

    from PIL import Image

    _, training, msic = builds
    photo = Image.open(Path(__file__).parent / "data" / "dreambench" / "dog" / "00.jpg").convert("RGB")
    png, jpeg = io.BytesIO(), io.BytesIO()
    photo.save(png, format="PNG")
    photo.resize((photo.width * 3 // 4, photo.height * 3 // 4), Image.Resampling.BICUBIC).save(jpeg, format="JPEG", quality=80)
    # The benchmark with a real photo as a case's first reference (random zoo models cannot tell
    # noise images apart once JPEG has smoothed them; a photo keeps its content).
    bench = tmp_path / "bench" / "msic"
    shutil.copytree(msic["a"], bench)
    spec = str(msic["a"].parent / "spec.yaml")
    case = _replace_reference(bench / "data" / "test-00000-of-00001.parquet", 0, 0, {"bytes": png.getvalue(), "path": None})
    clean = run_ok("msic", "check-overlap", str(bench), str(training), "--spec", spec)
    assert "no overlap" in clean and "near-duplicates: centred CLIP >= 0.99 and DINO >= 0.99" in clean
    planted = tmp_path / "planted"
    shutil.copytree(training, planted)
    data_file = sorted((planted / "data").glob("*.parquet"))[0]
    leaked = _replace_reference(data_file, 0, 0, {"bytes": jpeg.getvalue(), "path": None})
    assert "no overlap" in run_ok("msic", "check-overlap", str(bench), str(planted), "--exact-only")  # other bytes
    done = music("msic", "check-overlap", str(bench), str(planted), "--spec", spec)
    assert done.returncode == 1, done.stdout + done.stderr
    found = [line for line in done.stderr.splitlines() if "near-duplicates" in line]
    assert found and found[0].startswith(f"{case['case_id']}: reference 1 near-duplicates training sample {leaked['id']} (reference 1): CLIP ")
    clip, dino = (float(v) for v in re.findall(r"(?:CLIP|DINO) ([0-9.]+)", found[0]))
    assert clip >= 0.99 and dino >= 0.99
    assert "also in training" not in done.stderr


def test_published_benchmark_records_its_checks_prompts_and_preview(builds):
    """The build of a (checked against the training set): the card reports both checks with the
    highest similarities of the clean pair; every CLIP-T prompt fits CLIP's context, cut only when
    the full text does not, at a word boundary; the preview sheets exist."""
    from music_model.roles import load_role
    from tasks.publishing.msic import clip_t_prompt, clip_text_budget
    from tasks.stages import load_build_spec

    _, training, msic = builds
    card = (msic["a"] / "README.md").read_text()
    assert f"contamination check against `{training}`: no exact overlap" in card and "no near-duplicate" in card
    assert "near-duplicate sources removed before selection" in card and "docs/FIDELITY.md" in card
    previews = re.findall(r"\]\((preview/[^)]+\.png)\)", card)
    assert previews and all((msic["a"] / p).exists() for p in previews)
    count, limit = clip_text_budget(load_role(load_build_spec(msic["a"].parent / "spec.yaml").roles["clip"]))
    assert limit == 77
    cases = pq.read_table(msic["a"] / "data" / "test-00000-of-00001.parquet").to_pylist()
    for case in cases:
        full = clip_t_prompt(case["instruction"], case["categories"])
        assert count(case["prompt"]) <= limit
        assert case["prompt_cut"] == (count(full) > limit)
        if case["prompt_cut"]:
            words, kept = full.split(), case["prompt"].split()
            assert words[: len(kept)] == kept and count(" ".join(words[: len(kept) + 1])) > limit
        else:
            assert case["prompt"] == full
        assert len(case["boxes"]) == case["subject_count"]


def test_near_duplicate_sources_are_removed_before_cases_are_selected(builds, tmp_path):
    """msic.yaml's filter.near_duplicate_clip applies to the benchmark: at -1 every source but the
    first nearly duplicates it, so every case comes from that one source."""
    from tasks.engine.contract import num_shards
    from tasks.publishing.msic import publish_msic
    from tasks.stages import load_build_spec

    _, _, msic = builds
    spec = load_build_spec(msic["a"].parent / "spec.yaml")
    spec = spec.model_copy(update={"output_root": str(tmp_path), "filter": spec.filter.model_copy(update={"near_duplicate_clip": -1.0}),
                                   "msic": spec.msic.model_copy(update={"training_dataset": None})})
    (filter_dir,) = (msic["a"].parent / "stages" / "filter").iterdir()
    rows = [r for p in sorted(filter_dir.glob("part-*[0-9].parquet")) for r in pq.read_table(p).to_pylist()]
    sources = {r["source_id"] for r in rows}
    result = publish_msic(spec, filter_dir, num_shards(spec), "near-duplicates")
    assert result["near_duplicate_sources"] == len(sources) - 1 > 0
    dropped = pq.read_table(tmp_path / spec.name / "stages" / "publish-msic" / "near-duplicates" / "dropped.parquet").to_pylist()
    assert {d["reason"] for d in dropped} == {"near_duplicate"} and len(dropped) == sum(r["source_id"] != min(sources) for r in rows)
    cases = pq.read_table(tmp_path / spec.name / "msic" / "data" / "test-00000-of-00001.parquet").to_pylist()
    assert len({c["source_id"] for c in cases}) == 1
    assert f"(CLIP >= -1.0): {len(sources) - 1}" in (tmp_path / spec.name / "msic" / "README.md").read_text()


def test_flow_runs_are_named_by_the_spec_name_with_the_path_a_parameter(builds, tiny_build, prefect_api):
    import httpx

    tmp, _, _ = builds
    for name, spec in (("build-tiny", tiny_build["spec"]), ("msic-msic_tiny", tmp / "a-msic_tiny.yaml")):
        runs = httpx.post(f"{prefect_api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [name]}}}, timeout=30).json()
        assert any(run["parameters"].get("spec_path") == str(spec) for run in runs), (name, [r["parameters"] for r in runs])
