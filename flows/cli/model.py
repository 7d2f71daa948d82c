"""`music train`, `music generate` and `music pipeline`: the MUSIC model's commands.

Specs and inputs are checked before the Prefect server starts or any model loads (exit code 2 with
one line naming the problem); the work runs as the `train`, `music-generate` and `music-pipeline`
flows on the local (or $PREFECT_API_URL) server. `music generate case` generates for one ad-hoc
case without Prefect."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from data_specs.roles import SpecError
from flows.cli.shared import fail, quiet_model_progress_bars, start_server

generate_app = typer.Typer(help="Generate with the MUSIC model (plan, then render; Pass@N; seeds recorded).", no_args_is_help=True)

SPEC_HELP = "Training spec YAML (shipped: train_tiny.yaml = the tiny zoo, train_music.yaml = Qwen2.5-VL-7B + FLUX.1 Kontext)."


def _spec(spec: Path, **changes):
    """The spec with the command line's changes (None: unchanged), validated."""
    from data_specs.train import load_train_spec, parse_train_spec

    parsed = load_train_spec(spec)
    data = parsed.model_dump()
    for key, value in changes.items():
        if value is None:
            continue
        section, _, field = key.partition(".")
        if field:
            data[section] = {**data[section], field: value}
        else:
            data[section] = value
    return parse_train_spec(data, source=str(spec))


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def train_command(
    spec: Path = typer.Argument(..., help=SPEC_HELP),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Published training set folder (default: the spec's dataset)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Output root (default: the spec's output_root)."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name: the folder under the output root (default: the spec's name)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the run summary as JSON here."),
) -> None:
    """Train the MUSIC model's LoRA adapters (planner + renderer); a rerun resumes from the newest checkpoint."""
    try:
        parsed = _spec(spec, dataset=str(dataset) if dataset else None, output_root=str(output) if output else None, name=name,
                       max_steps=max_steps)
        parsed.dataset_dir()
    except (SpecError, FileNotFoundError, ValueError) as error:
        fail(error)
    start_server()
    typer.echo(f"Output: {parsed.out_dir()}")
    from flows.train import train

    summary = train(parsed.model_dump_json())
    if json_out:
        json_out.write_text(json.dumps(summary, indent=1))
    first, last = summary["first"] or {}, summary["last"] or {}
    typer.echo(f"trained {summary['steps']} of {summary['total_steps']} steps" +
               (f" (resumed from {summary['resumed_from']})" if summary["resumed_from"] else ""))
    typer.echo(f"  planner CE {_fmt(first.get('planner'))} -> {_fmt(last.get('planner'))}   "
               f"renderer {_fmt(first.get('renderer'))} -> {_fmt(last.get('renderer'))}")
    typer.echo(f"adapters: {Path(summary['output']) / 'adapter'}; report: {Path(summary['output']) / 'report.md'}")


def pipeline_command(
    spec: Path = typer.Argument(..., help=SPEC_HELP + " Its `pipeline` section names the build specs."),
    output: Optional[Path] = typer.Option(None, "--output", help="Output root of the training run (default: the spec's)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the pipeline summary as JSON here."),
) -> None:
    """Rebuild the training set, regenerate MSIC, train, then generate and evaluate on MSIC and DreamBench."""
    from data_specs.eval import load_eval_spec
    from data_specs.train import resolve_spec_path
    from tasks.stages import load_build_spec

    try:
        parsed = _spec(spec, output_root=str(output) if output else None)
        if parsed.pipeline is None:
            raise SpecError(f"{spec}: pipeline: no pipeline section (build_spec, msic_spec)")
        load_build_spec(resolve_spec_path(parsed.pipeline.build_spec))
        if parsed.pipeline.msic_spec:
            load_build_spec(resolve_spec_path(parsed.pipeline.msic_spec))
        load_eval_spec(resolve_spec_path(parsed.evaluation.eval_spec))
    except (SpecError, FileNotFoundError, ValueError) as error:
        fail(error)
    start_server()
    from flows.pipeline import music_pipeline

    summary = music_pipeline(parsed.model_dump_json())
    if json_out:
        json_out.write_text(json.dumps(summary, indent=1))
    typer.echo(f"dataset: {summary['dataset']}\nMSIC: {summary['msic']}\nadapters: {Path(summary['train']['output']) / 'adapter'}")
    typer.echo(f"report: {summary['report']} ({summary['wall_seconds']:.1f} s)")


def _generate(benchmark: str, spec: Path, adapters: Optional[Path], candidates: Optional[int], seed: Optional[int],
              score: bool, json_out: Optional[Path], **changes) -> None:
    from tasks.evaluate import registry  # no Prefect: checked before the server starts

    try:
        parsed = _spec(spec, **{"generation.candidates": candidates, "generation.seed": seed, **changes})
        if adapters is not None and not any((adapters / part).is_dir() for part in ("planner", "renderer")):
            raise FileNotFoundError(f"--adapters {adapters}: no planner/ or renderer/ folder (a training run's adapter folder)")
        check = registry.benchmark(benchmark).generation.check
        if check:
            check(parsed)
    except (SpecError, FileNotFoundError, ValueError) as error:
        fail(error)
    start_server()
    from flows.pipeline import music_generate

    summary = music_generate(parsed.model_dump_json(), benchmark, str(adapters) if adapters else None, score)
    if json_out:
        json_out.write_text(json.dumps(summary, indent=1))
    typer.echo(f"generated into {summary['output']} ({summary['candidates']} candidates per case, seed {summary['seed']})")
    if score:
        typer.echo(f"report: {Path(summary['scores']['output']) / 'report.md'}")
        for point in summary["scores"].get("passn", []):
            if point["n"] == summary["candidates"]:
                values = "  ".join(f"{k}={v:.4f}" for k, v in point.items() if k not in ("selector", "n") and v is not None)
                typer.echo(f"  Pass@{point['n']} {point['selector']:14s} {values}")


@generate_app.command("msic")
def generate_msic(
    spec: Path = typer.Option(Path("train_tiny.yaml"), "--spec", help=SPEC_HELP),
    adapters: Optional[Path] = typer.Option(None, "--adapters", help="A training run's adapter folder (default: the base models)."),
    msic: Optional[str] = typer.Option(None, "--msic", help="MSIC benchmark folder or cases Parquet (default: the spec's evaluation.msic)."),
    candidates: Optional[int] = typer.Option(None, "--candidates", help="Pass@N: candidates per case (default: the spec's)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Generation seed (default: the spec's)."),
    score: bool = typer.Option(True, "--score/--no-score", help="Run the evaluate flow on the candidates."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary as JSON here."),
) -> None:
    """N candidates per MSIC case, then scoring with Pass@N curves for both selectors."""
    _generate("msic", spec, adapters, candidates, seed, score, json_out, **{"evaluation.msic": msic})


@generate_app.command("dreambench")
def generate_dreambench(
    spec: Path = typer.Option(Path("train_tiny.yaml"), "--spec", help=SPEC_HELP),
    adapters: Optional[Path] = typer.Option(None, "--adapters", help="A training run's adapter folder (default: the base models)."),
    subjects: Optional[str] = typer.Option(None, "--subjects", help="Comma-separated subjects (default: the spec's, else all)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Comma-separated prompt indices 0..24 (default: the spec's, else all)."),
    candidates: Optional[int] = typer.Option(None, "--candidates", help="Pass@N: images per prompt (default: the spec's)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Generation seed (default: the spec's)."),
    score: bool = typer.Option(True, "--score/--no-score", help="Run the evaluate flow on the images."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary as JSON here."),
) -> None:
    """N images per DreamBench subject and prompt (the subject's photo as <s1>), then scoring."""
    try:
        prompt_list = [int(p) for p in prompts.split(",")] if prompts else None
    except ValueError:
        fail(ValueError(f"--prompts: not comma-separated integers: {prompts!r}"))
    _generate("dreambench", spec, adapters, candidates, seed, score, json_out,
              **{"evaluation.dreambench_subjects": subjects.split(",") if subjects else None, "evaluation.dreambench_prompts": prompt_list})


@generate_app.command("case")
def generate_case(
    instruction: str = typer.Option(..., "--instruction", help="The instruction, subjects named <s1>, <s2>, ... in reference order."),
    references: list[Path] = typer.Option(..., "--reference", help="A subject's reference image (repeat, in <sN> order)."),
    categories: Optional[list[str]] = typer.Option(None, "--category", help="A subject's category (repeat, one per reference)."),
    out: Path = typer.Option(..., "--out", help="Folder for the candidates (<k>.png) and generation.json."),
    spec: Path = typer.Option(Path("train_tiny.yaml"), "--spec", help=SPEC_HELP),
    adapters: Optional[Path] = typer.Option(None, "--adapters", help="A training run's adapter folder (default: the base models)."),
    candidates: Optional[int] = typer.Option(None, "--candidates", help="Pass@N: candidates (default: the spec's)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Generation seed (default: the spec's)."),
) -> None:
    """One case without Prefect: N candidates, each selector's pick (scored by the spec's eval models), seeds."""
    from data_specs.eval import load_eval_spec
    from data_specs.train import resolve_spec_path
    from music_model.scoring.metrics import UnreadableImage, decode_image

    try:
        parsed = _spec(spec, **{"generation.candidates": candidates, "generation.seed": seed})
        if categories and len(categories) != len(references):
            raise ValueError(f"{len(categories)} --category for {len(references)} --reference")
        images = [decode_image(path) for path in references]
        eval_spec = load_eval_spec(resolve_spec_path(parsed.evaluation.eval_spec))
    except (SpecError, FileNotFoundError, ValueError, UnreadableImage) as error:
        fail(error)
    from music_model.music.model import GenerationCase, MusicModel, pick, save_image, selection_scores
    from music_model.music.renderer import name_subjects

    quiet_model_progress_bars()
    names = list(categories) if categories else [None] * len(images)
    case = GenerationCase("case", instruction, images, names, name_subjects(instruction, names))
    model = MusicModel.from_spec(parsed, adapters)
    made = model.generate([case], parsed.generation.candidates, parsed.generation.seed)[0]
    rows = selection_scores([case], [made], eval_spec)[0]
    records = []
    for candidate, row in zip(made, rows):
        save_image(candidate.image, out / f"{candidate.index}.png")
        records.append({**candidate.record(f"{candidate.index}.png"), "select_clip_t": row["select_clip_t"],
                        "grounded_dino": row["grounded_dino"]})
    picks = {selector: pick(rows, selector, eval_spec.passn.identity_weight) for selector in ("clip_t", "identity_aware")}
    (out / "generation.json").write_text(json.dumps({"instruction": instruction, "categories": names, "seed": parsed.generation.seed,
                                                     "candidates": records, "picks": picks}, indent=1))
    typer.echo(f"{len(made)} candidates in {out}; picks: " + ", ".join(f"{k} -> {v}.png" for k, v in picks.items()))
