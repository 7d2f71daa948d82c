"""The `evaluate` flow against a real Prefect server: DreamBench from a folder (real photos as the
generated images, with bad files among them), generation then scoring through `music eval`,
multi-subject cases with Pass@N, a rerun that skips done shards, and bad input failing before work.

Prefect, flows.evaluate and tasks.evaluate are imported inside the tests (conftest starts the server
after collection)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from data_specs.eval import CASES, load_eval_spec

pytestmark = pytest.mark.prefect


def tiny_spec(tmp_path: Path, name: str, **changes) -> tuple[str, Path]:
    data = load_eval_spec("eval_tiny.yaml").model_dump()
    data |= {"name": name, "output_root": str(tmp_path / "out"), **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return json.dumps(data), path


def artifact_keys(api: str, prefix: str) -> set[str]:
    import httpx

    artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"like_": prefix}}, "limit": 200}).json()
    return {a["key"] for a in artifacts}


def music(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dreambench_run(tmp_path_factory, dreambench_dir, prefect_api):
    from flows.evaluate import evaluate

    tmp_path = tmp_path_factory.mktemp("dreambench")
    images = tmp_path / "generated"
    for subject in sorted(p for p in dreambench_dir.iterdir() if p.is_dir()):
        (images / subject.name).mkdir(parents=True)
        for index, photo in enumerate(sorted(subject.glob("*.jpg"))):
            shutil.copy(photo, images / subject.name / f"{index:02d}_0.jpg")
    (images / "vase" / "05_0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt: dropped at decode
    (images / "dog" / "dog_in_snow.png").write_bytes(b"x")  # wrong name: dropped at the scan
    spec_json, _ = tiny_spec(tmp_path, "db-tiny")
    first = evaluate(spec_json, "dreambench", images=str(images), bench_root=str(dreambench_dir))
    again = evaluate(spec_json, "dreambench", images=str(images), bench_root=str(dreambench_dir))
    return first, again


def test_dreambench_flow_writes_scores_report_and_artifacts(dreambench_run, prefect_api):
    summary, _ = dreambench_run
    out = Path(summary["output"])
    images = pq.read_table(out / "scores" / "images.parquet").to_pylist()
    subjects = pq.read_table(out / "scores" / "subjects.parquet").to_pylist()
    assert len(images) == 18 and len(subjects) == 6 and summary["images_scored"] == 18
    assert summary["dropped"] == {"bad_name": 1, "unreadable_image": 1}
    dropped = pq.read_table(out / "dropped.parquet").to_pylist()
    assert {Path(d["path"]).name: d["reason"] for d in dropped} == {"dog_in_snow.png": "bad_name", "05_0.png": "unreadable_image"}
    assert summary["scale"].startswith("raw cosine") and summary["models"] == {"dino": "zoo:dino_vits16", "clip": "zoo:clip_b32"}
    for metric in ("dino", "clip_i", "clip_t"):
        estimate = summary["scores"]["all"][metric]
        assert estimate["ci_low"] <= estimate["mean"] <= estimate["ci_high"] and estimate["n"] == 18
    published = [row for row in summary["comparison"] if row["source"].startswith("published")]
    assert [(row["dino"], row["clip_i"]) for row in published] == [(0.761, 0.837)]
    assert summary["comparison"][-1]["source"] == "measured here" and summary["passn"] == []
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["scores"] == summary["scores"] and on_disk["images_scored"] == 18
    report = (out / "report.md").read_text()
    for words in ("raw cosine", "published figure", "Tiny random zoo models", "dog_in_snow.png", "| backpack |"):
        assert words in report
    assert (out / "plots" / "subjects.png").stat().st_size > 1000
    keys = artifact_keys(prefect_api, "eval-db-tiny-%")
    assert {"eval-db-tiny-scores", "eval-db-tiny-subjects", "eval-db-tiny-comparison", "eval-db-tiny-dropped", "eval-db-tiny-report"} <= keys


def test_a_rerun_skips_done_shards_and_gives_the_same_scores(dreambench_run):
    first, again = dreambench_run
    assert first["task_runs"] == 2 and again["task_runs"] == 0
    assert all(shard["skipped"] for shard in again["shards"])
    assert again["scores"] == first["scores"]


def test_cases_flow_reports_grounded_scores_missing_rate_and_passn(tmp_path, dreambench_dir, prefect_api):
    from flows.evaluate import evaluate
    from test_metrics import synthetic_cases

    rows = synthetic_cases(dreambench_dir, [("dog",), ("cat", "backpack"), ("dog", "dog6", "vase")], candidates=2)
    rows[0]["generated"].append({"bytes": None, "path": "absent.png"})  # a missing file: that candidate is dropped
    cases = tmp_path / "cases.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CASES), cases)
    spec_json, _ = tiny_spec(tmp_path, "cases-tiny", shard_size=2)
    summary = evaluate(spec_json, "msic", cases=str(cases))
    out = Path(summary["output"])
    assert summary["cases_scored"] == 3 and summary["images_scored"] == 6 and summary["dropped"] == {"missing_file": 1}
    counts = summary["by_subject_count"]
    assert [row["subjects"] for row in counts] == ["1", "2", "3", "all"]
    assert all(0 <= row["missing_rate"] <= 1 and row["worst_dino"] <= row["grounded_dino"] + 1e-9 for row in counts)
    assert any(row["missing_rate"] > 0 for row in counts)  # the tiny spec's thresholds leave subjects unfound
    curve = summary["passn"]
    assert {(p["selector"], p["n"]) for p in curve} == {("clip_t", 1), ("clip_t", 2), ("identity_aware", 1), ("identity_aware", 2)}
    at_one = [p for p in curve if p["n"] == 1]
    assert at_one[0]["uno_dino"] == pytest.approx(counts[-1]["uno_dino"])  # Pass@1 is the mean over candidates
    assert summary["models"]["clip_select"] == "zoo:clip_l14" and summary["task_runs"] == 2
    report = (out / "report.md").read_text()
    assert "missing rate" in report and "worst-subject DINO" in report and "## Pass@N" in report
    assert "| MUSIC (Pass@N) | published figure" in report
    for name in ("by_subject_count.png", "passn.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    subjects = pq.read_table(out / "scores" / "subjects.parquet").to_pylist()
    assert len(subjects) == 2 * (1 + 2 + 3) and any(not s["found"] for s in subjects)
    assert {"eval-cases-tiny-by-subject-count", "eval-cases-tiny-passn", "eval-cases-tiny-report"} <= artifact_keys(prefect_api, "eval-cases-tiny-%")


def test_music_eval_generates_then_scores_with_passn(tmp_path, dreambench_dir, prefect_api):
    generation = {"images_per_prompt": 2, "width": 64, "height": 64, "seed": 0, "subjects": ["dog", "teapot"], "prompt_indices": [0, 21]}
    _, spec = tiny_spec(tmp_path, "gen-tiny", generation=generation)
    images = tmp_path / "made"
    done = music("eval", "dreambench", "--images", str(images), "--generator", "editor=zoo:flux_kontext", "--spec", str(spec),
                 "--bench", str(dreambench_dir), "--json", str(tmp_path / "summary.json"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Prefect UI: http://127.0.0.1:" in done.stdout and f"Output: {tmp_path / 'out' / 'gen-tiny'}" in done.stdout
    assert sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png")) == [
        f"{s}/{p}_{k}.png" for s in ("dog", "teapot") for p in ("00", "21") for k in (0, 1)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images_scored"] == 8 and summary["models"]["clip_select"] == "zoo:clip_l14"
    assert max(p["n"] for p in summary["passn"]) == 2
    assert "clip_t=" in done.stdout and "report:" in done.stdout


def test_bad_input_fails_before_the_server_or_any_model(tmp_path, dreambench_dir):
    (tmp_path / "empty").mkdir()
    done = music("eval", "dreambench", "--images", str(tmp_path / "empty"), "--spec", "eval_tiny.yaml", "--bench", str(dreambench_dir))
    assert done.returncode == 2 and "error:" in done.stderr and "the folder is empty" in done.stderr
    assert "Prefect UI" not in done.stdout
    done = music("eval", "msic", "--cases", str(tmp_path / "absent.parquet"), "--spec", "eval_tiny.yaml")
    assert done.returncode == 2 and "cases file not found" in done.stderr
    done = music("eval", "dreambench", "--images", str(tmp_path), "--generator", "painter=zoo:flux", "--spec", "eval_tiny.yaml")
    assert done.returncode == 2 and "generator.role" in done.stderr
