"""The MUSIC model's flows against a real Prefect server: `music pipeline` (rebuild the tiny training
set -> regenerate a small MSIC -> train -> generate 4 candidates per case and evaluate on MSIC and
DreamBench with Pass@4), `music train` with a resume, and a bad spec failing before any work.

Prefect and the flows are imported inside the tests only (conftest starts the server after collection)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from test_build import copy_build

from data_specs import shipped

pytestmark = pytest.mark.prefect

PLAN = {"grid": 8, "max_relations": 0, "max_field_words": 1, "max_word_chars": 4, "max_seq_len": 1024}


def music(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=900)


def artifacts(api: str, prefix: str) -> dict[str, dict]:
    """The latest version of each artifact whose key matches `prefix` (a SQL LIKE pattern)."""
    import httpx

    found = httpx.post(f"{api}/artifacts/latest/filter", json={"artifacts": {"key": {"like_": prefix}}, "limit": 200}).json()
    return {a["key"]: a for a in found}


def write_specs(tmp_path: Path, build_spec: Path) -> Path:
    out = str(tmp_path / "out")
    msic = yaml.safe_load(shipped("msic_tiny.yaml").read_text()) | {
        "name": "flow-msic", "output_root": out, "num_source_images": 2, "subject_counts": {3: 1}, "shard_size": 2,
        "msic": {"version": "flow-1", "strata": [1, 2, 3], "cases_per_stratum": 1}}
    train = yaml.safe_load(shipped("train_tiny.yaml").read_text()) | {
        "name": "flow-train", "output_root": str(tmp_path / "train"), "plan": PLAN, "max_steps": 3, "checkpoint_every": 2,
        "generation": {"candidates": 4, "seed": 5, "selector": "clip_t", "shard_size": 2},
        "evaluation": {"eval_spec": "eval_tiny.yaml", "msic": None, "dreambench": True, "dreambench_subjects": ["dog"],
                       "dreambench_prompts": [0]},
        "pipeline": {"build_spec": str(build_spec), "msic_spec": str(tmp_path / "msic.yaml")}}
    for name, data in (("msic", msic), ("train", train)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "train.yaml"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_build) -> dict:
    """The pipeline over a copy of the session's tiny build (its rebuild resumes it) and a small
    MSIC of its own, built from scratch."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    spec = write_specs(tmp_path, copy_build(tiny_build, tmp_path))
    done = music("pipeline", str(spec), "--json", str(tmp_path / "summary.json"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return {"summary": json.loads((tmp_path / "summary.json").read_text()), "stdout": done.stdout, "tmp": tmp_path}


def test_the_pipeline_rebuilds_trains_and_evaluates_with_pass_at_4(pipeline, prefect_api):
    summary = pipeline["summary"]
    assert Path(summary["dataset"]).name == "dataset" and sorted(Path(summary["dataset"]).glob("data/*.parquet"))
    train = summary["train"]
    assert train["steps"] == 3 and set(train["adapters"]) == {"planner", "renderer"} and Path(train["plot"]).stat().st_size > 1000
    # The build's and the benchmark's models were freed before training loaded its own.
    assert train["models_resident_at_start"] == []

    msic = summary["evaluation"]["msic"]
    cases = pq.read_table(msic["cases_file"]).to_pylist()
    assert len(cases) == 3 and all(len(case["generated"]) == 4 for case in cases)
    records = pq.read_table(msic["generation_file"]).to_pylist()
    assert len(records) == 12 and len({(r["plan_seed"], r["render_seed"]) for r in records}) == 12  # every seed recorded, distinct
    assert all(r["plan"].startswith("Subjects:\n<s1> ") and r["plan_error"] is None for r in records)
    assert all((Path(msic["cases_file"]).parent / r["path"]).exists() for r in records)
    scores = msic["scores"]
    assert scores["cases_scored"] == 3 and scores["images_scored"] == 12
    assert {(p["selector"], p["n"]) for p in scores["passn"]} == {(s, n) for s in ("clip_t", "identity_aware") for n in (1, 2, 3, 4)}
    assert [row["subjects"] for row in scores["by_subject_count"]] == ["1", "2", "3", "all"]

    dreambench = summary["evaluation"]["dreambench"]
    images = sorted(p.relative_to(dreambench["images_dir"]).as_posix() for p in Path(dreambench["images_dir"]).rglob("*.png"))
    assert images == [f"dog/00_{k}.png" for k in range(4)]
    assert dreambench["scores"]["images_scored"] == 4 and max(p["n"] for p in dreambench["scores"]["passn"]) == 4

    report = Path(summary["report"]).read_text()
    assert "| selector | n |" in report and "### msic" in report and "### dreambench" in report
    keys = set(artifacts(prefect_api, "flow-train-%"))
    assert {"flow-train-losses", "flow-train-train-report", "flow-train-train-progress", "flow-train-generate-msic",
            "flow-train-generate-dreambench", "flow-train-pipeline-report"} <= keys
    assert "Prefect UI: http://127.0.0.1:" in pipeline["stdout"] and "report:" in pipeline["stdout"]


def test_music_generate_msic_again_generates_nothing_and_rescores_nothing(pipeline):
    tmp_path, summary = pipeline["tmp"], pipeline["summary"]
    done = music("generate", "msic", "--spec", str(tmp_path / "train.yaml"), "--adapters", str(Path(summary["train"]["output"]) / "adapter"),
                 "--msic", summary["msic"], "--json", str(tmp_path / "generate.json"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    again = json.loads((tmp_path / "generate.json").read_text())
    first = summary["evaluation"]["msic"]
    assert again["output"] == first["output"] and all(shard["skipped"] for shard in again["shards"])
    assert again["scores"]["task_runs"] == 0 and again["scores"]["passn"] == first["scores"]["passn"]
    assert "Pass@4 clip_t" in done.stdout and "Pass@4 identity_aware" in done.stdout


def test_music_train_on_the_published_set_then_resume(pipeline, prefect_api):
    tmp_path = pipeline["tmp"]
    dataset = pipeline["summary"]["dataset"]
    args = ["train", str(tmp_path / "train.yaml"), "--dataset", dataset, "--name", "cli-train", "--output", str(tmp_path / "cli")]
    first = music(*args, "--max-steps", "1", "--json", str(tmp_path / "first.json"))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    again = music(*args, "--max-steps", "2", "--json", str(tmp_path / "again.json"))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("first", "again"))
    assert one["steps"] == 1 and one["resumed_from"] is None
    assert two["steps"] == 2 and two["resumed_from"] == "step-00000001" and "(resumed from step-00000001)" in again.stdout
    history = [json.loads(line) for line in (Path(two["output"]) / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [1, 2] and history[0] == one["last"]
    found = artifacts(prefect_api, "cli-train-%")
    assert {"cli-train-losses", "cli-train-train-report"} <= set(found)
    assert "data:image/png;base64," in found["cli-train-train-report"]["data"]
    table = found["cli-train-losses"]["data"]
    assert [row["step"] for row in (json.loads(table) if isinstance(table, str) else table)] == [1, 2]
    assert (Path(two["output"]) / "report.md").read_text().count("![loss curve](plots/loss.png)") == 1


def test_a_bad_training_spec_fails_before_the_server_or_any_model(tmp_path):
    done = music("train", "train_tiny.yaml", "--dataset", str(tmp_path / "absent"))
    assert done.returncode == 2 and "dataset: no published Parquet" in done.stderr and "Prefect UI" not in done.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(yaml.safe_load(shipped("train_tiny.yaml").read_text()) | {"lora": {"rank": 0}}))
    done = music("train", str(bad))
    assert done.returncode == 2 and "lora.rank" in done.stderr
