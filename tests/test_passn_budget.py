"""Pass@N below linear cost: pruned trajectories, the cost ledger, the judge that never selects, and
`music eval passn-budget` on the session's tiny MSIC."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_specs.eval import JUDGE_METRICS
from music_model.roles import load_role

EDITOR = {"role": "editor", "backend": "diffusers", "model": "zoo:flux_kontext", "batch_size": 4, "options": {"num_inference_steps": 4}}
SELECT = {"role": "clip", "backend": "transformers", "model": "zoo:clip_l14", "dtype": "float32", "batch_size": 16}
JUDGE = {"role": "vlm", "backend": "transformers", "model": "zoo:qwen2_5_vl", "batch_size": 16, "options": {"max_pixels": 50176}}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_a_pruned_survivor_is_byte_identical_to_its_full_render_and_the_ledger_counts_the_scheduler_steps(zoo_root, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from music_model.music.trajectory import Trajectories
    from music_model.scoring.passn import halving
    from music_model.scoring.metrics import Scorer

    editor = load_role(EDITOR)
    rng = np.random.default_rng(3)
    canvases = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    prompts = [f"a red thing number {k} beside a blue one" for k in range(4)]
    seeds = [101, 202, 303, 404]
    step = FlowMatchEulerDiscreteScheduler.step
    calls = []

    def counted(self, *args, **kwargs):  # the real step, counted
        calls.append(1)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step", counted)
    selector = Scorer(None, None, load_role(SELECT)).selection_scores
    images, scores, ledger = Trajectories(editor).run(canvases, prompts, seeds, 64, 64, [0, 1], halving(0.5), selector, prompts)

    # 4 candidates halved after step 0 and after step 1: 4 + 2 + 1 + 1 steps, one survivor.
    assert len(calls) == ledger.denoise_steps == 8
    assert ledger.latent_token_steps == 8 * 16 and ledger.renders == 1
    assert ledger.decodes == 4 + 2 + 1 and ledger.selector_calls == 4 + 2
    assert sorted(scores) == [0, 1] and len(scores[0]) == 4 and len(scores[1]) == 2
    survivors = [k for k, image in enumerate(images) if image is not None]
    assert survivors == [max(scores[1], key=lambda k: (scores[1][k], -k))]
    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step", step)
    for k in survivors:  # the pipeline's own call on that candidate alone, all 4 steps
        assert png(images[k]) == png(editor.edit([canvases[k]], [prompts[k]], [seeds[k]], 64, 64)[0])


def _rows(judge_offset: float) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for case in range(5):
        for k in range(8):
            rows.append({"case_id": f"c{case}", "candidate": k, "n_subjects": 1 + case % 3, "plan_score": float(rng.random()),
                         "step_scores": [float(rng.random())], "select_clip_t": float(rng.random()), "grounded_dino": float(rng.random()),
                         "clip_t": float(rng.random()), "judge": float(rng.random()) + judge_offset})
    return rows


class NoJudge(dict):
    """A candidate row that fails on any read of a judge column."""

    def __getitem__(self, key):
        if key in {m.name for m in JUDGE_METRICS}:
            raise AssertionError(f"selection read {key}")
        return super().__getitem__(key)


def test_selection_never_reads_the_judge():
    from music_model.music.model import pick
    from music_model.scoring.passn import budget_table, passn_curve, replay, strategies

    rows = [NoJudge(r) for r in _rows(0.0)]
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case_id"], []).append(row)
    picks = {c: (pick(r, "clip_t"), pick(r, "identity_aware"), *(replay(r, 2, 16, **plan)[0] for plan in strategies(8, [0], 0.5, 2).values()))
             for c, r in by_case.items()}
    passn_curve(rows, ("case_id",), ["clip_t"], "grounded_dino")
    # The judge's values change nothing that is chosen: every strategy keeps the same candidate, so
    # only the judge's own column of the budget table moves.
    plans = strategies(8, [0], 0.5, 2)
    first, second = (budget_table(_rows(offset), ["clip_t", "judge"], 2, 16, plans, samples=20) for offset in (0.0, 5.0))
    assert [r["clip_t"] for r in first] == [r["clip_t"] for r in second]
    assert [r["judge"] + 5.0 for r in first] == pytest.approx([r["judge"] for r in second])
    assert all(len(set(p)) >= 1 for p in picks.values())


@pytest.mark.slow
def test_the_judge_on_the_dreambench_subset_is_deterministic_with_intervals(zoo_root, dreambench_dir):
    from music_model.scoring.dreambench import load_dreambench
    from music_model.scoring.judge import judge_images
    from music_model.scoring.metrics import bootstrap_estimate, decode_image

    bench = load_dreambench(dreambench_dir)
    subjects = sorted(bench.subjects)
    # each subject's second photo judged against its first, with the subject's first prompt
    images = [decode_image(bench.subjects[s].references[1]) for s in subjects]
    references = [[decode_image(bench.subjects[s].references[0])] for s in subjects]
    texts = [bench.prompt(s, 0) for s in subjects]
    judge = load_role(JUDGE)
    first = judge_images(judge, images, references, [[bench.classes[s]] for s in subjects], texts)
    again = judge_images(judge, images, references, [[bench.classes[s]] for s in subjects], texts)
    assert first == again
    for metric in JUDGE_METRICS:
        values = [row[metric.name] for row in first]
        assert all(0.0 <= v <= 1.0 for v in values)
        estimate = bootstrap_estimate(values, subjects, equal_group_weight=True, samples=200)
        assert estimate.ci_low <= estimate.mean <= estimate.ci_high and estimate.n == len(subjects)


@pytest.mark.prefect
def test_music_eval_passn_budget_on_the_tiny_msic(msic_build, prefect_api, tmp_path):
    import subprocess
    import sys

    import pyarrow.parquet as pq
    import yaml

    from data_specs import shipped

    data = yaml.safe_load(shipped("train_tiny.yaml").read_text())
    data |= {"output_root": str(tmp_path / "out")}
    from music_model.music.model import msic_cases_file

    cases_file = tmp_path / "cases.parquet"  # three cases keep the test cheap: the counts are per case
    pq.write_table(pq.read_table(msic_cases_file(msic_build["dir"] / "msic")).slice(0, 3), cases_file)
    data["evaluation"]["msic"] = str(cases_file)
    data["generation"] |= {"shard_size": 64}
    spec = tmp_path / "train.yaml"
    spec.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "flows.cli", "eval", "passn-budget", "--spec", str(spec), "--candidates", "4",
                           "--json", str(tmp_path / "budget.json")], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "budget.json").read_text())
    table = {row["strategy"]: row for row in summary["budget"]}
    cases = summary["cases"]
    full = table["full"]
    # costs are exact counts: full renders all 4 candidates, 2 steps each; screen-2 half of that;
    # halving after step 0 runs 4 + 2 steps and renders 2
    assert (full["renders"], full["denoise_steps"], full["latent_token_steps"]) == (4, 8, 8 * 16)
    assert (table["screen-2"]["renders"], table["screen-2"]["denoise_steps"]) == (2, 4)
    assert (table["prune-0x0.5"]["renders"], table["prune-0x0.5"]["denoise_steps"], table["prune-0x0.5"]["decodes"]) == (2, 6, 6)
    assert table["best-of-4"]["R_clip_t"] == pytest.approx(1.0) and table["best-of-1"]["R_clip_t"] == pytest.approx(0.0, abs=1e-12)
    candidates = pq.read_table(f"{summary['output']}/shards/part-00000.candidates.parquet").to_pylist()
    assert cases == 3 and len(candidates) == 4 * cases and all(len(r["step_scores"]) == 1 for r in candidates)
    assert all(json.loads(r["cost"])["denoise_steps"] == 8 for r in candidates)
    assert (tmp_path / "out").joinpath("train-tiny").exists() and summary["plot"].endswith("budget.png")
    from test_evaluate_flow import artifact_keys

    assert {"train-tiny-passn-budget", "train-tiny-passn-budget-cost"} <= artifact_keys(prefect_api, "train-tiny-passn-budget%")
    assert "meaningless" in (tmp_path / "out" / "train-tiny" / "passn_budget").joinpath(summary["output"].split("/")[-1], "report.md").read_text()


def test_a_prune_step_with_nothing_left_to_save_fails_naming_the_field():
    from data_specs.roles import SpecError
    from data_specs.train import load_train_spec, parse_train_spec

    data = load_train_spec("train_tiny.yaml").model_dump()
    data["generation"] |= {"strategy": "prune", "prune_at": [1]}  # the tiny renderer runs steps 0 and 1
    with pytest.raises(SpecError, match=r"generation\.prune_at: step 1 leaves nothing to save"):
        parse_train_spec(data, "train_tiny.yaml")
