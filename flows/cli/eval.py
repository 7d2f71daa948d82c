"""`music eval`: score generated images on DreamBench or on multi-subject (MSIC-style) cases.

Inputs and the spec are checked before the Prefect server starts or any model loads; the run is the
`evaluate` flow on the local (or $PREFECT_API_URL) server, and its outputs land in
`<output_root>/<name>/` (report.md, summary.json, scores/*.parquet, plots/)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from data_specs.roles import SpecError
from flows.cli.shared import fail, start_server

eval_app = typer.Typer(help="Score generated images: DreamBench and multi-subject cases (DINO, CLIP-I, CLIP-T; raw cosines).",
                       no_args_is_help=True)

SPEC_HELP = "Eval spec YAML (shipped: eval_dreambench.yaml = real checkpoints, eval_tiny.yaml = the tiny zoo)."


def _spec(spec: Path, output: Optional[Path], name: Optional[str], generator: Optional[str] = None):
    from data_specs.eval import load_eval_spec, parse_eval_spec, parse_generator

    parsed = load_eval_spec(spec)
    changes = {k: v for k, v in {"output_root": str(output) if output else None, "name": name}.items() if v}
    if generator:
        changes["generator"] = parse_generator(generator).model_dump()
    return parse_eval_spec({**parsed.model_dump(), **changes}, source=str(spec)) if changes else parsed


def _metrics(benchmark: str) -> list[str]:
    """The benchmark's headline scores, which the command prints."""
    from tasks.evaluate.registry import benchmark as registered

    return [m.name for m in registered(benchmark).metrics]


def _run(benchmark: str, spec, json_out: Optional[Path], **inputs) -> dict:
    start_server(loads_models=False)
    typer.echo(f"Output: {spec.out_dir().resolve()}")
    from flows.evaluate import evaluate

    summary = evaluate(spec.model_dump_json(), benchmark, **inputs)
    if json_out:
        json_out.write_text(json.dumps(summary, indent=1))
    return summary


@eval_app.command("dreambench")
def dreambench(
    images: Path = typer.Option(..., "--images", help="Generated images, named <subject>/<PP>_<K>.<ext> "
                                "(PP: prompt index 00-24, K: sample 0,1,..; png/jpg/jpeg/webp). With --generator they are written here."),
    generator: Optional[str] = typer.Option(None, "--generator", help="Generate first: a role spec YAML, or editor=<model> / t2i=<model>."),
    bench: Optional[Path] = typer.Option(None, "--bench", help="DreamBench folder in the upstream layout (default: the spec's dreambench_root)."),
    spec: Path = typer.Option(Path("eval_dreambench.yaml"), "--spec", help=SPEC_HELP),
    output: Optional[Path] = typer.Option(None, "--output", help="Output root (default: the spec's output_root)."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name: the output folder under the root (default: the spec's name)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary as JSON here."),
) -> None:
    """DreamBench: DINO and CLIP-I over every generated x real pair of a subject, CLIP-T with the class noun."""
    from music_model.scoring.dreambench import DreamBenchError, load_dreambench, scan_generated

    try:
        parsed = _spec(spec, output, name, generator)
        root = bench or parsed.dreambench_root
        if root is None:
            raise DreamBenchError("no DreamBench folder: pass --bench or set dreambench_root in the spec")
        benchmark = load_dreambench(root)
        if parsed.generator is None:
            scan = scan_generated(benchmark, images)
            typer.echo(f"{len(scan.images)} images to score in {images}" + (f"; left out {scan.drop_counts()}" if scan.drops else ""))
    except (SpecError, DreamBenchError, FileNotFoundError, ValueError) as error:
        fail(error)
    summary = _run("dreambench", parsed, json_out, images=str(images), bench_root=str(root))
    scores = summary["scores"]["all"]
    typer.echo(f"scored {summary['images_scored']} images of {scores['subjects']} subjects ({summary['scale']}):")
    typer.echo("  " + "  ".join(f"{m}={scores[m]['mean']:.4f} [{scores[m]['ci_low']:.4f}, {scores[m]['ci_high']:.4f}]"
                                for m in _metrics("dreambench")))
    typer.echo(f"dropped: {summary['dropped'] or 'none'}; report: {Path(summary['output']) / 'report.md'}")


@eval_app.command("msic")
def msic(
    cases: Path = typer.Option(..., "--cases", help="Cases Parquet (schema data_specs.eval.CASES): instruction, prompt, "
                               "categories, references, generated (one or more candidates)."),
    spec: Path = typer.Option(Path("eval_dreambench.yaml"), "--spec", help=SPEC_HELP),
    output: Optional[Path] = typer.Option(None, "--output", help="Output root (default: the spec's output_root)."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default: the spec's name)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary as JSON here."),
) -> None:
    """Multi-subject cases: UNO-style and grounded scores, missing rate, worst subject, by subject count, Pass@N."""
    from music_model.scoring.multisubject import CasesError, read_cases_table

    try:
        parsed = _spec(spec, output, name)
        table = read_cases_table(cases)
        typer.echo(f"{len(table)} cases in {cases}")
    except (SpecError, CasesError, FileNotFoundError, ValueError) as error:
        fail(error)
    summary = _run("msic", parsed, json_out, cases=str(cases))
    overall = summary["by_subject_count"][-1] if summary["by_subject_count"] else {}
    typer.echo(f"scored {summary['images_scored']} images of {summary['cases_scored']} cases ({summary['scale']}):")
    typer.echo("  " + "  ".join(f"{m}={overall[m]:.4f}" for m in _metrics("msic") if overall.get(m) is not None))
    typer.echo(f"dropped: {summary['dropped'] or 'none'}; report: {Path(summary['output']) / 'report.md'}")


@eval_app.command("passn-budget")
def passn_budget_command(
    spec: Path = typer.Option(Path("train_tiny.yaml"), "--spec", help="Training spec YAML: the model, N (generation.candidates), "
                              "the strategies' knobs (generation.*), the eval spec (with a `judge` role) and the MSIC benchmark."),
    adapters: Optional[Path] = typer.Option(None, "--adapters", help="A training run's adapter folder (default: the base models)."),
    msic: Optional[str] = typer.Option(None, "--msic", help="MSIC benchmark folder or cases Parquet (default: the spec's evaluation.msic)."),
    candidates: Optional[int] = typer.Option(None, "--candidates", help="N: candidates per case (default: the spec's)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary as JSON here."),
) -> None:
    """Pass@N at fewer renders: plan screening and pruned trajectories replayed from one full pass, with R(C) against cost."""
    from flows.cli.model import _spec as train_spec
    from tasks.evaluate.cases import check_generation

    try:
        parsed = train_spec(spec, **{"generation.candidates": candidates, "evaluation.msic": msic})
        if adapters is not None and not any((adapters / part).is_dir() for part in ("planner", "renderer")):
            raise FileNotFoundError(f"--adapters {adapters}: no planner/ or renderer/ folder (a training run's adapter folder)")
        check_generation(parsed)  # passn-budget renders MSIC's cases as `music generate msic` does
    except (SpecError, FileNotFoundError, ValueError) as error:
        fail(error)
    start_server()
    from flows.pipeline import passn_budget

    summary = passn_budget(parsed.model_dump_json(), str(adapters) if adapters else None)
    if json_out:
        json_out.write_text(json.dumps(summary, indent=1))
    typer.echo(f"{summary['cases']} cases, N = {summary['candidates']}, {summary['steps']} steps x {summary['tokens']} latent tokens per render")
    full = next(r for r in summary["budget"] if r["strategy"] == "full")
    for row in summary["budget"]:
        typer.echo(f"  {row['strategy']:28s} renders {row['renders']:5.2f}  steps {row['denoise_steps']:6.2f} "
                   f"({row['denoise_steps'] / full['denoise_steps']:.0%} of full)  R(clip_t) {row['R_clip_t']:+.2f}  R(judge) {row['R_judge']:+.2f}")
    typer.echo(f"report: {summary['report']}; plot: {summary['plot']}")
