"""`music eval passn-budget`: Pass@N strategies that spend fewer renders, judged against `full`.

One pass per shard of MSIC cases: every case's N plans, then every candidate denoised to its end
alone (music_model.music.trajectory) with the selector's score of its predicted clean image after
every step, then the final images scored (UNO-style, grounded, CLIP-T, the selector) and judged
(the `judge` role, never selecting). `finish_budget` replays every strategy on those records
(music_model.scoring.passn.replay: a pruned survivor's image is its full trajectory's image) and
writes, under `<run>/passn_budget/`:

    images/<case>/<k>.png, shards/part-00000.candidates.parquet (+ marker)
    budget.parquet        per strategy: cost per case, mean kept score, R(C) with its interval
    rank_agreement.parquet  Kendall tau of the score after each step against the final score
    judge_by_subject_count.parquet, report.md, plots/budget.png
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from prefect import task

from data_specs.eval import CLIP_T, GROUNDED_DINO, JUDGE, JUDGE_METRICS, UNO_CLIP_I, UNO_DINO, EvalSpec
from data_specs.train import TrainSpec
from music_model.music.model import load_model, read_msic_cases, save_image, selection_scores
from music_model.music.trajectory import Trajectories
from music_model.roles import load_role
from music_model.scoring.judge import judge_images
from music_model.scoring.metrics import Scorer, bootstrap_estimate
from music_model.scoring.passn import budget_table, rank_agreement, strategies
from safe_files import write_atomic
from tasks.engine.contract import write_table
from tasks.engine.markers import run_marked, shard_marker, shard_name
from tasks.evaluate.common import figure, gather, markdown_table, save_figure, with_ci, write_json

METRICS = (UNO_DINO, UNO_CLIP_I, CLIP_T, GROUNDED_DINO, *JUDGE_METRICS)
BUDGET_CANDIDATES = pa.schema([
    ("case_id", pa.string()), ("candidate", pa.int32()), ("n_subjects", pa.int32()), ("path", pa.string()),
    ("plan_score", pa.float64()), ("step_scores", pa.list_(pa.float64())), ("select_clip_t", pa.float64()),
    *(m.column for m in METRICS), ("cost", pa.string()),
])


def budget_shard(train_json: str, eval_json: str, adapters: str | None, cases_path: str, start: int, stop: int, shard: int,
                 out_dir: str) -> dict:
    """Cases [start, stop): all N candidates rendered in full, step scores recorded, scored and judged."""
    out = Path(out_dir)

    def work() -> tuple[dict, list[Path]]:
        spec, eval_spec = TrainSpec.model_validate_json(train_json), EvalSpec.model_validate_json(eval_json)
        model = load_model(spec, adapters)
        cases = read_msic_cases(cases_path, start, stop)
        groups = model.plan(cases, spec.generation.candidates, spec.generation.seed)
        trajectories = Trajectories(model.renderer.editor)
        selector = Scorer(None, None, load_role(eval_spec.roles["clip_select"])).selection_scores
        costs = []
        for case, group in zip(cases, groups):
            n = len(group)
            canvases, prompts = model.renderer.inputs([case.references] * n, [c.plan for c in group], [case.instruction] * n,
                                                      [case.categories] * n, model.width, model.height)
            images, scores, ledger = trajectories.run(canvases, prompts, [c.render_seed for c in group], model.width, model.height,
                                                      range(trajectories.steps - 1), None, selector, [case.prompt or case.instruction] * n)
            ledger.plans = n
            costs.append(ledger.record())
            for k, candidate in enumerate(group):
                candidate.image = images[k]
                candidate.step_scores = {step: values[k] for step, values in scores.items()}
                save_image(images[k], out / "images" / case.case_id / f"{k}.png")
        scored = selection_scores(cases, groups, eval_spec)
        judge = load_role(eval_spec.roles["judge"])
        rows = []
        for case, group, case_rows, cost in zip(cases, groups, scored, costs):
            verdicts = judge_images(judge, [c.image for c in group], [case.references] * len(group),
                                    [[c or "subject" for c in case.categories]] * len(group), [case.prompt or case.instruction] * len(group))
            for candidate, row, verdict in zip(group, case_rows, verdicts):
                rows.append({"case_id": case.case_id, "candidate": candidate.index, "n_subjects": row["n_subjects"],
                             "path": f"images/{case.case_id}/{candidate.index}.png", "plan_score": candidate.plan_score,
                             "step_scores": [candidate.step_scores[s] for s in sorted(candidate.step_scores)],
                             "select_clip_t": row["select_clip_t"], **{m.name: row[m.name] for m in METRICS if m.name in row}, **verdict,
                             "cost": json.dumps(cost, sort_keys=True)})
        path = out / "shards" / f"{shard_name(shard)}.candidates.parquet"
        write_table(rows, BUDGET_CANDIDATES, path)
        return {"shard": shard, "cases": len(cases), "candidates": len(rows)}, [path]

    return run_marked(shard_marker(out / "shards", shard), work)


@task(name="passn-budget-shard", task_run_name="passn-budget-shard-{shard:05d}")
def budget_shard_task(train_json: str, eval_json: str, adapters: str | None, cases_path: str, start: int, stop: int, shard: int,
                      out_dir: str) -> dict:
    return budget_shard(train_json, eval_json, adapters, cases_path, start, stop, shard, out_dir)


def judge_by_subject_count(rows: list[dict], spec: EvalSpec) -> list[dict]:
    """The judge of a single sample (the mean over a case's candidates) by subject count and over
    all cases, with the bootstrap intervals of the other metrics (stratified by subject count)."""
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case_id"], []).append(row)
    names = [m.name for m in JUDGE_METRICS]
    cases = [{"n_subjects": r[0]["n_subjects"], **{m: float(np.nanmean([x[m] for x in r])) for m in names}} for r in by_case.values()]
    b = spec.bootstrap
    table = []
    for count in sorted({c["n_subjects"] for c in cases}) + ["all"]:
        chosen = [c for c in cases if count == "all" or c["n_subjects"] == count]
        row = {"subjects": str(count), "cases": len(chosen)}
        for m in names:
            e = bootstrap_estimate([c[m] for c in chosen], [c["n_subjects"] for c in chosen], samples=b.samples, confidence=b.confidence, seed=b.seed)
            row |= {m: e.mean, f"{m}_ci_low": e.ci_low, f"{m}_ci_high": e.ci_high}
        table.append(row)
    return table


def plot_budget(table: list[dict], metrics: list[str], path: Path) -> None:
    """R against denoising steps per case: best-of-k as the baseline line, each strategy a point."""
    plt = figure()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.2), squeeze=False)
    baseline = [r for r in table if r["strategy"].startswith("best-of-")]
    others = [r for r in table if not r["strategy"].startswith("best-of-")]
    for ax, metric in zip(axes[0], metrics):
        ax.plot([r["denoise_steps"] for r in baseline], [r[f"R_{metric}"] for r in baseline], marker="o", color="grey", label="best-of-k")
        for r in others:
            ax.errorbar([r["denoise_steps"]], [r[f"R_{metric}"]], yerr=[[r[f"R_{metric}"] - r[f"R_{metric}_ci_low"]],
                        [r[f"R_{metric}_ci_high"] - r[f"R_{metric}"]]], marker="s", capsize=3, label=r["strategy"])
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_title(f"R ({metric})", fontsize=9)
        ax.set_xlabel("denoising steps per case")
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Retained Pass@N gain against cost")
    save_figure(plt, fig, path)


def finish_budget(spec: TrainSpec, eval_spec: EvalSpec, out: Path, shards: int, steps: int, tokens: int, models: dict) -> dict:
    rows = gather(out / "shards", shards, "candidates", BUDGET_CANDIDATES)
    g = spec.generation
    n = g.candidates
    plans = strategies(n, g.prune_at, g.prune_fraction, min(g.screen_keep, n))
    b = eval_spec.bootstrap
    table = budget_table(rows, [m.name for m in METRICS], steps, tokens, plans, b.samples, b.confidence, b.seed)
    tau = rank_agreement(rows, steps)
    judged = judge_by_subject_count(rows, eval_spec)
    write_table(table, pa.schema([("strategy", pa.string())] + [(k, pa.float64()) for k in table[0] if k != "strategy"]), out / "budget.parquet")
    write_table(tau, pa.schema([("step", pa.int32()), ("kendall_tau", pa.float64()), ("cases", pa.int32())]), out / "rank_agreement.parquet")
    write_table(judged, pa.schema([("subjects", pa.string()), ("cases", pa.int32())] + [(k, pa.float64()) for k in judged[0] if k not in ("subjects", "cases")]),
                out / "judge_by_subject_count.parquet")
    plot_budget(table, [CLIP_T.name, GROUNDED_DINO.name, JUDGE.name], out / "plots" / "budget.png")
    full = next(r for r in table if r["strategy"] == "full")
    cost_columns = ["strategy", "renders", "denoise_steps", "latent_token_steps", "decodes", "selector_calls"]
    cost_rows = [{**{k: r[k] for k in cost_columns}, "steps_vs_full": r["denoise_steps"] / full["denoise_steps"],
                  "renders_vs_full": r["renders"] / full["renders"]} for r in table]
    quality = [{"strategy": r["strategy"], **{m: with_ci(r[f"R_{m}"], r[f"R_{m}_ci_low"], r[f"R_{m}_ci_high"]) for m in (CLIP_T.name, UNO_DINO.name, GROUNDED_DINO.name, JUDGE.name)}}
               for r in table]
    tiny = any(str(m).startswith("zoo:") for m in models.values())
    lines = [f"# Pass@N budget: {spec.name}", "",
             f"{len({r['case_id'] for r in rows})} MSIC cases, N = {n} candidates each, {steps} denoising steps of "
             f"{tokens} latent tokens per render. Every candidate was rendered to its end once (alone, step by step), with the "
             "selector's score of its predicted clean image (x0 = x_t - sigma_t v) after every step; each strategy is replayed "
             "from those records, which is exact because a pruning survivor continues its own trajectory.", "",
             *(["**Tiny random models:** the quality columns (scores, R) are meaningless as quality; the cost columns "
                "(renders, steps, tokens, decodes, selector calls) are exact counts.", ""] if tiny else []),
             "## Cost per case (the final choice's selector calls included)", "", *markdown_table(cost_rows), "",
             "## Retained gain R(C) = (S(C) - S_1) / (S_N - S_1), paired 95% bootstrap over cases", "",
             "S_1: one candidate (mean over the N); S_N: `full` (best of N by the selector). best-of-k: the expected score of the "
             "selector's pick among k random candidates, the baseline at equal cost. The judge never selected.", "",
             *markdown_table(quality), "", "![R against cost](plots/budget.png)", "",
             "## How well the score after step t ranks the final images (Kendall tau-b, mean over cases)", "",
             *markdown_table(tau), "",
             "## The judge (VQAScore-style p(yes) of the `judge` VLM; ours, not the paper's), one sample, by subject count", "",
             *markdown_table([{"subjects": r["subjects"], "cases": r["cases"], **{m.name: with_ci(r[m.name], r[f"{m.name}_ci_low"], r[f"{m.name}_ci_high"]) for m in JUDGE_METRICS}}
                              for r in judged]), "",
             "Models: " + ", ".join(f"{k} `{v}`" for k, v in models.items())]
    text = "\n".join(lines) + "\n"
    write_atomic(out / "report.md", lambda tmp: tmp.write_text(text))
    summary = {"output": str(out), "cases": len({r["case_id"] for r in rows}), "candidates": n, "steps": steps, "tokens": tokens,
               "budget": table, "rank_agreement": tau, "judge": judged, "report": str(out / "report.md"), "plot": str(out / "plots" / "budget.png")}
    write_json(out / "summary.json", summary)
    return summary | {"markdown": text, "cost_rows": cost_rows}
