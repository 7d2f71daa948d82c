"""MUSIC generation on the benchmarks and the parent pipeline.

- `music_generate(spec_json, benchmark, adapters)`: N candidates per MSIC case (or per DreamBench
  subject and prompt) from a trained model, one task run per shard, then the `evaluate` flow scores
  them: Pass@N curves for both selectors (`clip_t`, `identity_aware`) come from the scoring code.
  MSIC candidates go to a cases table (data_specs.eval.CASES) with the images beside it; DreamBench
  images follow the naming convention `<subject>/<PP>_<K>.png`. Outputs live in
  `<run>/generated/<benchmark>-<fingerprint>/` (the fingerprint covers the models, adapters,
  generation parameters and benchmark inputs, so a rerun with the same ones generates nothing).
- `music_pipeline(spec_json)`: rebuild the training set -> regenerate MSIC (checked for overlap with
  the new training set) -> train -> generate and evaluate on MSIC and DreamBench; a markdown report
  of every step as an artifact and `<run>/pipeline_report.md`.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from data_specs.eval import load_eval_spec, parse_eval_spec
from data_specs.train import TrainSpec, load_train_spec, resolve_spec_path
from flows.ops.monitor import on_flow_running
from flows.run_names import artifact_key, run_name
from music_model.music.model import msic_cases_file
from music_model.roles import release_roles
from safe_files import write_atomic
from tasks.evaluate import registry
from tasks.evaluate.common import chunks, files_digest, json_safe
from tasks.evaluate.shard_tasks import generate_task


def _generation_content(spec: TrainSpec) -> dict:
    """The generation fields that change images; `full` ignores the strategy's knobs, so its
    fingerprint (and folder) is the one it had before strategies existed."""
    generation = spec.generation
    ignored = {"selector", "shard_size"} | ({"strategy", "screen_keep", "prune_at", "prune_fraction"} if generation.strategy == "full" else set())
    return generation.model_dump(exclude=ignored)


def _generation_fingerprint(spec: TrainSpec, adapters: str | None, inputs: str) -> str:
    adapter_files = sorted(p for p in Path(adapters).rglob("*") if p.is_file()) if adapters else []
    payload = {"planner": spec.planner.model_dump(), "renderer": spec.renderer.model_dump(), "plan": spec.plan.model_dump(),
               "render": spec.render.model_dump(), "generation": _generation_content(spec),
               "adapters": files_digest(adapter_files), "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _eval_spec_json(spec: TrainSpec, benchmark: str) -> str:
    """The scoring spec, its run named after the training run and written under it."""
    base = load_eval_spec(resolve_spec_path(spec.evaluation.eval_spec))
    data = {**base.model_dump(), "name": f"{spec.name}-{benchmark}", "output_root": str(spec.out_dir() / "eval"), "generator": None}
    return parse_eval_spec(data, source=spec.evaluation.eval_spec).model_dump_json()


@flow(name="music-generate", flow_run_name=run_name("music-generate", "benchmark"), log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def music_generate(spec_json: str, benchmark: str, adapters: str | None = None, score: bool = True) -> dict:
    """Generate the spec's Pass@N candidates on a benchmark with the model (plus trained `adapters`),
    then (with `score`) run `evaluate` on them. Returns paths, generation counts and the scores summary."""
    from flows.evaluate import evaluate

    bench = registry.benchmark(benchmark)
    if bench.generation is None:
        raise ValueError(f"benchmark {benchmark!r}: the MUSIC model does not generate on it")
    logger = get_run_logger()
    started = time.perf_counter()
    spec = TrainSpec.model_validate_json(spec_json)
    eval_json = _eval_spec_json(spec, benchmark)  # a bad scoring spec fails before any generation
    plan = bench.generation.plan(spec, logger)
    out = spec.out_dir() / "generated" / f"{benchmark}-{_generation_fingerprint(spec, adapters, plan.inputs)}"
    futures = generate_task.map(unmapped(spec_json), unmapped(benchmark), unmapped(adapters), plan.shards, list(range(len(plan.shards))),
                                unmapped(str(out)))
    shards = [f.result() for f in futures]
    fields, inputs = bench.generation.finish(out, plan)
    result = {"benchmark": benchmark, **fields}
    table = [{k: v for k, v in s.items() if not isinstance(v, (list, dict))} for s in shards]
    create_table_artifact(table, key=artifact_key(spec.name, "generate", benchmark),
                          description=f"{spec.name}: MUSIC generation on {benchmark}, {spec.generation.candidates} candidates per case")
    logger.info("generated on %s in %d shards (%d skipped) into %s", benchmark, len(shards), sum(s["skipped"] for s in shards), out)
    result |= {"output": str(out), "candidates": spec.generation.candidates, "seed": spec.generation.seed, "shards": shards}
    if score:
        result["scores"] = evaluate(eval_json, benchmark, **inputs)
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    return json_safe(result)


@flow(name="passn-budget", flow_run_name=run_name("passn-budget"), log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def passn_budget(spec_json: str, adapters: str | None = None) -> dict:
    """Pass@N strategies against `full` on the spec's MSIC (tasks/evaluate/passn_budget.py): one
    task run per shard renders every candidate in full with its step scores; the flow replays the
    strategies, writes report.md, budget.parquet and the plot, and publishes them as artifacts."""
    from music_model.roles.editor import DiffusersEditor
    from tasks.evaluate.passn_budget import budget_shard_task, finish_budget

    logger = get_run_logger()
    spec = TrainSpec.model_validate_json(spec_json)
    eval_json = _eval_spec_json(spec, "msic")
    eval_spec = parse_eval_spec(json.loads(eval_json))
    if "judge" not in eval_spec.roles:
        raise ValueError(f"{spec.evaluation.eval_spec}: roles.judge: passn-budget reports the judge (a vlm role)")
    if not spec.evaluation.msic:
        raise ValueError("evaluation.msic: no MSIC benchmark given (its folder or cases Parquet)")
    cases = msic_cases_file(spec.evaluation.msic)
    fingerprint = _generation_fingerprint(spec, adapters, files_digest([cases.resolve()]) + eval_json)
    out = spec.out_dir() / "passn_budget" / f"msic-{fingerprint}"
    ranges = chunks(list(range(pq.ParquetFile(cases).metadata.num_rows)), spec.generation.shard_size)
    futures = budget_shard_task.map(unmapped(spec_json), unmapped(eval_json), unmapped(adapters), unmapped(str(cases)), [r[0] for r in ranges],
                                    [r[-1] + 1 for r in ranges], list(range(len(ranges))), unmapped(str(out)))
    [f.result() for f in futures]
    steps = int((DiffusersEditor.OPTION_DEFAULTS | spec.renderer.options).get("num_inference_steps"))
    tokens = (spec.render.width // 16) * (spec.render.height // 16)  # FLUX: 8x VAE, 2x2 packing
    models = {"planner": spec.planner.model, "renderer": spec.renderer.model,
              **{k: v.model for k, v in eval_spec.roles.items() if k in ("clip_select", "judge")}}
    summary = finish_budget(spec, eval_spec, out, len(ranges), steps, tokens, models)
    create_markdown_artifact(summary.pop("markdown"), key=artifact_key(spec.name, "passn-budget"),
                             description=f"{spec.name}: Pass@N strategies against full (renders, steps, retained gain)")
    create_table_artifact(summary.pop("cost_rows"), key=artifact_key(spec.name, "passn-budget-cost"),
                          description=f"{spec.name}: cost per case of each Pass@N strategy")
    logger.info("passn-budget: report %s, plot %s", summary["report"], summary["plot"])
    return json_safe(summary)


def _msic_spec_path(spec: TrainSpec, msic_spec: str, dataset: str) -> Path:
    """The MSIC build spec with the new training set as the one it is checked against for overlap."""
    data = yaml.safe_load(resolve_spec_path(msic_spec).read_text())
    data.setdefault("msic", {})["training_dataset"] = dataset
    path = spec.out_dir() / "msic_spec.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(yaml.safe_dump(data, sort_keys=False)))
    return path


def _passn_rows(name: str, scores: dict, metrics: list[str]) -> list[dict]:
    return [{"benchmark": name, "selector": p["selector"], "n": p["n"], **{m: p.get(m) for m in metrics}} for p in scores.get("passn", [])]


def pipeline_report(spec: TrainSpec, built: dict, msic: dict | None, trained: dict, evaluated: dict) -> str:
    def fmt(value) -> str:
        return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    first, last = trained["first"] or {}, trained["last"] or {}
    lines = [f"# MUSIC pipeline: {spec.name}", "",
             f"1. Training set: {built['samples']} samples published to {built['dataset']} ({built['task_runs']} task runs).",
             f"2. MSIC: {msic['cases']} cases in {msic['msic']}." if msic else "2. MSIC: not regenerated.",
             f"3. Training: {trained['steps']} steps; planner CE {fmt(first.get('planner'))} -> {fmt(last.get('planner'))}, "
             f"renderer {fmt(first.get('renderer'))} -> {fmt(last.get('renderer'))}; adapters in {Path(trained['output']) / 'adapter'}.",
             f"4. Evaluation ({spec.generation.candidates} candidates per case, seed {spec.generation.seed}): this project's "
             "model (a Qwen2.5-VL planner + FLUX.1 Kontext renderer, not the paper's SEED-X-based one) on this project's "
             "regeneration of MSIC, so no score below is one of the paper's (docs/FIDELITY.md).", ""]
    for benchmark, result in evaluated.items():
        scores = result["scores"]
        lines += [f"### {benchmark}", "", f"- report: {Path(scores['output']) / 'report.md'}"]
        metrics = [m.name for m in registry.benchmark(benchmark).metrics]
        rows = _passn_rows(benchmark, scores, metrics)
        if rows:
            lines += ["", "| selector | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
            lines += [f"| {r['selector']} | {r['n']} | " + " | ".join(fmt(r[m]) for m in metrics) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines) + "\n"


@flow(name="music-pipeline", flow_run_name=run_name("music-pipeline"), log_prints=True, on_running=[on_flow_running])
def music_pipeline(spec_json: str) -> dict:
    """Rebuild the training set, regenerate MSIC, train, then generate and evaluate on MSIC and
    DreamBench; every step is a subflow (completed stages and shards are not redone)."""
    from flows.build import build_training_set
    from flows.msic import build_msic
    from flows.train import train

    logger = get_run_logger()
    started = time.perf_counter()
    spec = TrainSpec.model_validate_json(spec_json)
    if spec.pipeline is None:
        raise ValueError("pipeline: the spec has no pipeline section (build_spec, msic_spec)")
    built = build_training_set(str(resolve_spec_path(spec.pipeline.build_spec)))
    msic = None
    evaluation = spec.evaluation.model_dump()
    if spec.pipeline.msic_spec:
        msic = build_msic(str(_msic_spec_path(spec, spec.pipeline.msic_spec, built["dataset"])))
        evaluation["msic"] = msic["msic"]
    trained_spec = TrainSpec.model_validate({**spec.model_dump(), "dataset": built["dataset"], "evaluation": evaluation})
    trained_json = trained_spec.model_dump_json()
    release_roles()  # each phase loads its own models: none of the build's stay for training
    trained = train(trained_json)
    release_roles()
    adapters = str(Path(trained["output"]) / "adapter")
    evaluated = {name: music_generate(trained_json, name, adapters) for name, bench in registry.benchmarks().items()
                 if bench.generation is not None and bench.generation.wanted(trained_spec)}
    text = pipeline_report(trained_spec, built, msic, trained, evaluated)
    write_atomic(trained_spec.out_dir() / "pipeline_report.md", lambda tmp: tmp.write_text(text))
    create_markdown_artifact(text, key=artifact_key(spec.name, "pipeline-report"), description=f"MUSIC pipeline report of {spec.name}")
    logger.info("pipeline done: report %s", trained_spec.out_dir() / "pipeline_report.md")
    return json_safe({"dataset": built["dataset"], "msic": msic["msic"] if msic else trained_spec.evaluation.msic, "train": trained,
                      "evaluation": evaluated, "report": str(trained_spec.out_dir() / "pipeline_report.md"),
                      "wall_seconds": round(time.perf_counter() - started, 2)})


@flow(name="music-pipeline-from-file", flow_run_name=run_name("music-pipeline"), on_running=[on_flow_running])
def pipeline_from_file(spec_path: str) -> dict:
    """`music_pipeline` from a spec file: the deployment entry point for scheduled runs."""
    return music_pipeline(load_train_spec(spec_path).model_dump_json())

