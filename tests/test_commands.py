"""The commands end to end, through the `music` entry point as users call it: `zoo build|list`,
`roles check`, `generate case`, `generate dreambench`, `worker --gpu` (a flow run on that worker
sees its GPU), the three spec-file flows the deployments call (`pipeline_from_file`,
`train_from_file`, `evaluate_from_file`), and every shipped spec and deployment parameter parsed.

Prefect and the flows are imported inside the tests (conftest starts the server after collection)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from data_specs import shipped
from music_model.zoo import ENTRIES, file_hashes

ROOT = Path(__file__).resolve().parent.parent
MUSIC = Path(sys.executable).parent / "music"
PHOTOS = Path(__file__).parent / "data" / "dreambench"


def music(*args: str, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(MUSIC), *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


# --- zoo and roles -------------------------------------------------------------------------------


@pytest.mark.slow
def test_zoo_build_then_list(zoo_root, tmp_path):
    out = ok(music("zoo", "build"))  # the session's zoo: entries other tests built are reused
    for name in ENTRIES:
        assert re.search(rf"^{name}\s+\d+\.\d\d MB\s+\d+\.\d\d s$", out, re.M), name
    assert re.search(rf"^zoo: {re.escape(str(zoo_root))}  \d+\.\d\d MB .* manifest: {re.escape(str(zoo_root / 'manifest.json'))}$", out, re.M)
    manifest = json.loads((zoo_root / "manifest.json").read_text())
    assert manifest == {name: file_hashes(zoo_root / name) for name in sorted(ENTRIES)}
    assert ok(music("zoo", "list")).splitlines() == [f"{name:16s} built" for name in sorted(ENTRIES)]

    # --dir, --only and --force: a rebuilt entry is byte-identical; list shows what a folder holds
    other = tmp_path / "zoo"
    ok(music("zoo", "build", "--dir", str(other), "--only", "dino_vits16"))
    ok(music("zoo", "build", "--dir", str(other), "--only", "dino_vits16", "--force"))
    assert json.loads((other / "manifest.json").read_text()) == {"dino_vits16": manifest["dino_vits16"]}
    listed = ok(music("zoo", "list", env={**os.environ, "MUSIC_ZOO_DIR": str(other)})).splitlines()
    assert "dino_vits16      built" in listed and f"{'qwen3':16s} -" in listed
    bad = music("zoo", "build", "--dir", str(other), "--only", "gpt5")
    assert bad.returncode == 2 and "unknown zoo entries ['gpt5']" in bad.stderr


@pytest.mark.slow
def test_roles_check_loads_every_role_and_backend(tmp_path):
    from music_model.roles import BACKENDS
    from music_model.roles.smoke import zoo_role_specs

    ok(music("roles", "check", "--device", "cpu", "--dtype", "float32", "--json", str(tmp_path / "roles.json")))
    rows = {row["name"]: row for row in json.loads((tmp_path / "roles.json").read_text())}
    assert rows.keys() == zoo_role_specs().keys()
    assert {(r["role"], r["backend"]) for r in rows.values()} == set(BACKENDS)
    for name, row in rows.items():
        assert row["ok"] and (row["device"], row["dtype"]) == ("cpu", "float32"), row
        assert row["load_s"] >= 0 and row["batch_s"] > 0
    assert rows["t2i"]["output"] == "images [(64, 64), (64, 64)]"
    assert re.fullmatch(r"[0-2]/2 schema-valid", rows["llm"]["output"])
    assert re.fullmatch(r"image \(2, \d+\), text \(2, \d+\)", rows["clip_transformers"]["output"])


# --- generate ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_case_writes_candidates_seeds_and_picks(tmp_path):
    args = ["generate", "case", "--instruction", "<s1> beside <s2>", "--reference", str(PHOTOS / "dog" / "00.jpg"),
            "--reference", str(PHOTOS / "teapot" / "00.jpg"), "--category", "dog", "--category", "teapot",
            "--candidates", "2", "--seed", "3"]
    out = ok(music(*args, "--out", str(tmp_path / "a")))
    record = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert record["instruction"] == "<s1> beside <s2>" and record["categories"] == ["dog", "teapot"] and record["seed"] == 3
    candidates = record["candidates"]
    assert [c["candidate"] for c in candidates] == [0, 1]
    assert len({(c["plan_seed"], c["render_seed"]) for c in candidates}) == 2
    for candidate in candidates:
        assert Image.open(tmp_path / "a" / candidate["path"]).size == (64, 64)  # train_tiny's render size
        assert isinstance(candidate["select_clip_t"], float)
    picks = record["picks"]
    assert set(picks) == {"clip_t", "identity_aware"} and set(picks.values()) <= {0, 1}
    assert f"2 candidates in {tmp_path / 'a'}; picks: clip_t -> {picks['clip_t']}.png, identity_aware -> {picks['identity_aware']}.png" in out

    one_category = music(*args[:-8], "--category", "dog", *args[-4:], "--out", str(tmp_path / "bad"))
    assert one_category.returncode == 2 and "1 --category for 2 --reference" in one_category.stderr
    absent = [str(tmp_path / "absent.png") if a.endswith("teapot/00.jpg") else a for a in args]
    unreadable = music(*absent, "--out", str(tmp_path / "bad"))
    assert unreadable.returncode == 2 and "absent.png" in unreadable.stderr
    assert not (tmp_path / "bad").exists()


def train_spec(tmp_path: Path, name: str, **changes) -> Path:
    data = yaml.safe_load(shipped("train_tiny.yaml").read_text()) | {"name": name, "output_root": str(tmp_path / "train")}
    data |= {"max_steps": 1, "checkpoint_every": 1, "plan": {"grid": 8, "max_relations": 0, "max_field_words": 1, "max_word_chars": 4,
                                                             "max_seq_len": 1024}}
    data["evaluation"] = data["evaluation"] | {"msic": None, "dreambench_subjects": ["dog"], "dreambench_prompts": [0]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data | changes))
    return path


@pytest.mark.prefect
def test_generate_dreambench_renders_every_subject_prompt_and_candidate_then_scores(prefect_api, tmp_path):
    spec = train_spec(tmp_path, "gen-db")
    out = ok(music("generate", "dreambench", "--spec", str(spec), "--subjects", "dog,teapot", "--prompts", "0,3",
                   "--candidates", "2", "--seed", "1", "--json", str(tmp_path / "summary.json")))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["candidates"] == 2 and summary["seed"] == 1
    images = Path(summary["images_dir"])
    found = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    assert found == [f"{s}/{p:02d}_{k}.png" for s in ("dog", "teapot") for p in (0, 3) for k in (0, 1)]
    assert summary["scores"]["images_scored"] == 8
    assert {(p["selector"], p["n"]) for p in summary["scores"]["passn"]} == {(s, n) for s in ("clip_t", "identity_aware") for n in (1, 2)}
    assert f"generated into {summary['output']}" in out and "Pass@2 clip_t" in out
    bad = music("generate", "dreambench", "--spec", str(spec), "--prompts", "zero")
    assert bad.returncode == 2 and "--prompts: not comma-separated integers" in bad.stderr and "Prefect UI" not in bad.stdout


# --- the worker ----------------------------------------------------------------------------------

PROBE = """import os

from prefect import flow


@flow(name="gpu-probe")
def probe(out: str) -> str:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"))
    return out
"""


@pytest.mark.prefect
def test_worker_pinned_to_a_gpu_runs_its_flow_runs_on_that_gpu(prefect_api, tmp_path):
    from prefect import flow
    from prefect.deployments import run_deployment
    from test_ops import stop

    from flows.ops.deploy import ensure_process_pool

    pool = "music-test-gpu-pin"
    ensure_process_pool(pool)
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "probe_flow.py").write_text(PROBE)
    flow.from_source(str(tmp_path / "probe"), "probe_flow.py:probe").deploy(name="probe", work_pool_name=pool, print_next_steps=False)
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen([str(MUSIC), "worker", "--gpu", "1", "--pool", pool], stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "2"}, start_new_session=True)
    try:
        run = run_deployment("gpu-probe/probe", parameters={"out": str(tmp_path / "seen" / "gpu")}, timeout=300)
        assert run.state.is_completed(), (run.state, log.read_text()[-3000:])
        assert (tmp_path / "seen" / "gpu").read_text() == "1"
    finally:
        stop(worker)
    header = log.read_text().splitlines()[0]
    assert f"pool: {pool}" in header and "CUDA_VISIBLE_DEVICES=1" in header and re.search(r"worker: music-test-gpu-pin-\S+-gpu1", header)


# --- the spec-file flows of the deployments -------------------------------------------------------


@pytest.mark.prefect
def test_the_deployments_spec_file_flows_run_from_yaml_paths(prefect_api, tmp_path):
    import httpx

    from flows.evaluate import evaluate_from_file
    from flows.pipeline import pipeline_from_file
    from flows.train import train_from_file

    build = yaml.safe_load(shipped("tiny.yaml").read_text()) | {"name": "file-tiny", "output_root": str(tmp_path / "out"),
                                                                "num_source_images": 8}
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(build))
    pipeline_spec = train_spec(tmp_path, "file-pipeline", generation={"candidates": 2, "seed": 0, "selector": "clip_t", "shard_size": 2},
                               pipeline={"build_spec": str(tmp_path / "build.yaml"), "msic_spec": None})
    pipeline = pipeline_from_file(str(pipeline_spec))
    assert pipeline["dataset"] == str(tmp_path / "out" / "file-tiny" / "dataset") and pipeline["msic"] is None
    assert pipeline["train"]["steps"] == 1 and Path(pipeline["report"]).exists()
    generated = Path(pipeline["evaluation"]["dreambench"]["images_dir"])
    assert sorted(p.name for p in (generated / "dog").glob("*.png")) == ["00_0.png", "00_1.png"]

    trained = train_from_file(str(train_spec(tmp_path, "file-train", dataset=pipeline["dataset"], pipeline=None)))
    assert trained["steps"] == 1 and trained["resumed_from"] is None
    assert (Path(trained["output"]) / "adapter" / "planner").is_dir()

    eval_spec = tmp_path / "eval.yaml"
    eval_spec.write_text(yaml.safe_dump(yaml.safe_load(shipped("eval_tiny.yaml").read_text()) | {"output_root": str(tmp_path / "eval")}))
    scored = evaluate_from_file(str(eval_spec), "dreambench", images=str(generated))
    assert scored["images_scored"] == 2 and Path(scored["output"]).is_relative_to(tmp_path / "eval")

    for flow_name, spec in (("music-pipeline-from-file", pipeline_spec), ("train-from-file", tmp_path / "file-train.yaml"),
                            ("evaluate-from-file", eval_spec)):
        runs = httpx.post(f"{prefect_api}/flow_runs/filter", json={"flows": {"name": {"any_": [flow_name]}}}).json()
        mine = [r for r in runs if r["parameters"].get("spec_path") == str(spec)]
        assert [r["state_type"] for r in mine] == ["COMPLETED"], (flow_name, runs)


# --- shipped specs -------------------------------------------------------------------------------


def test_every_shipped_spec_parses_and_says_what_it_claims():
    from data_specs.eval import load_eval_spec
    from data_specs.train import load_train_spec
    from music_model.roles.smoke import zoo_role_specs
    from tasks.stages import load_build_spec

    loaders = {"tiny.yaml": load_build_spec, "msic_tiny.yaml": load_build_spec, "music_10k.yaml": load_build_spec,
               "msic.yaml": load_build_spec, "train_tiny.yaml": load_train_spec, "train_music.yaml": load_train_spec,
               "eval_tiny.yaml": load_eval_spec, "eval_dreambench.yaml": load_eval_spec, "zoo_roles.yaml": lambda _: zoo_role_specs()}
    assert set(loaders) == {p.name for p in (ROOT / "data_specs").glob("*.yaml")}, "a new shipped spec needs its loader here"
    specs = {name: load(shipped(name)) for name, load in loaders.items()}
    real = [specs["music_10k.yaml"], specs["msic.yaml"]]
    for spec in real:  # the real configurations name hub checkpoints, never the tiny zoo
        assert not any(role.model.startswith("zoo:") for role in spec.roles.values())
    assert specs["music_10k.yaml"].target.samples == 10000 and specs["music_10k.yaml"].publish.max_samples is None
    assert specs["msic.yaml"].msic.strata == list(range(1, 13)) and specs["msic.yaml"].msic.cases_per_stratum == 20
    assert not specs["train_music.yaml"].planner.model.startswith("zoo:")
    for name in ("tiny.yaml", "msic_tiny.yaml"):
        assert all(role.model.startswith("zoo:") for role in specs[name].roles.values())
    for name in ("train_tiny.yaml", "train_music.yaml"):  # the specs a training spec names load too
        spec = specs[name]
        load_eval_spec(spec.evaluation.eval_spec)
        if spec.pipeline:
            load_build_spec(spec.pipeline.build_spec)
            if spec.pipeline.msic_spec:
                assert load_build_spec(spec.pipeline.msic_spec).msic is not None


def test_every_deployment_names_a_flow_whose_parameters_and_spec_load():
    from prefect.flows import load_flow_from_entrypoint

    from data_specs.eval import load_eval_spec
    from data_specs.train import load_train_spec
    from tasks.stages import load_build_spec

    loaders = {"build-training-set": load_build_spec, "build-msic": load_build_spec, "train-from-file": load_train_spec,
               "evaluate-from-file": load_eval_spec, "music-pipeline-from-file": load_train_spec}
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    seen = set()
    for deployment in config["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        flow.validate_parameters(deployment["parameters"])  # every parameter is one the flow takes
        loaders[flow.name](deployment["parameters"]["spec_path"])
        seen.add(flow.name)
    assert seen == set(loaders)
