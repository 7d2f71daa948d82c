"""`music plan`: what a build spec will cost before it runs (no model loads, no Prefect server)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows.cli.shared import fail


def plan_command(
    spec: Path = typer.Argument(..., help="Build spec YAML (e.g. data_specs/music_10k.yaml)."),
    bench: Optional[Path] = typer.Option(None, help="A benchmarks/gpu_pipeline.py result: measured keep rates and GPU-hours."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the plan as JSON here."),
) -> None:
    """Shards, task runs, expected samples, the models and memory each stage needs and, with --bench,
    the projected GPU-hours; loads no model."""
    from data_specs.roles import SpecError
    from tasks.checks.cost_plan import PlanError, format_plan, plan, read_bench
    from tasks.stages import load_build_spec

    try:
        parsed = load_build_spec(spec)
        result = plan(parsed, read_bench(bench) if bench else None)
    except (SpecError, PlanError, FileNotFoundError, ValueError) as error:
        fail(error)
    typer.echo(format_plan(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=1) + "\n")
