"""`music msic`: regenerate the MSIC benchmark, diff two regenerations, check it for contamination
(exact and near-duplicate overlap with a training set)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows.cli.shared import BUSY_EXIT, fail, fail_lines, quiet_model_progress_bars, refuse_failed_preflight, refuse_if_building, start_server

msic_app = typer.Typer(help="The MSIC benchmark (1-12 subjects per case).", no_args_is_help=True)


def _manifest(path: Path) -> dict:
    path = path / "manifest.json" if path.is_dir() else path
    if not path.exists():
        raise typer.BadParameter(f"no manifest at {path}")
    return json.loads(path.read_text())


@msic_app.command("build")
def build(
    spec: Path = typer.Argument(..., help="Benchmark spec YAML (e.g. data_specs/msic_tiny.yaml)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the run summary as JSON here."),
    verify: bool = typer.Option(False, "--verify", help="Check the sha256 of every reused shard part and stored image, not only sizes and footers."),
    wait: bool = typer.Option(False, "--wait", help="Wait for another run building into the same folder (default: exit 3 naming it)."),
) -> None:
    """Regenerate the benchmark as a Prefect flow on the local (or $PREFECT_API_URL) server."""
    from data_specs.roles import SpecError
    from tasks.stages import load_build_spec

    try:
        parsed = load_build_spec(spec)
    except (SpecError, FileNotFoundError, ValueError) as error:
        fail(error)
    if parsed.msic is None:
        fail(f"{spec}: not a benchmark spec (no `msic` section)")
    refuse_if_building(parsed, wait)
    refuse_failed_preflight(parsed)
    start_server()
    from flows.msic import build_msic
    from tasks.checks.preflight import PreflightError
    from tasks.engine.build_lock import BuildLocked

    try:
        result = build_msic(str(spec), verify, wait)
    except BuildLocked as error:
        fail(error, BUSY_EXIT)
    except PreflightError as error:  # the hub or the folder changed since the check
        fail_lines(error.problems)
    if json_out:
        json_out.write_text(json.dumps(result, indent=1))
    typer.echo(f"Published {result['cases']} cases to {result['msic']} in {result['wall_seconds']:.1f} s; per subject count: {result['counts']}")


@msic_app.command("diff")
def diff(a: Path = typer.Argument(..., help="An MSIC folder or its manifest.json."), b: Path = typer.Argument(...)) -> None:
    """Cases added, removed and changed (by content hash) from A to B."""
    from tasks.publishing.msic import diff_manifests

    ma, mb = _manifest(a), _manifest(b)
    changes = diff_manifests(ma, mb)
    typer.echo(f"A: {ma['name']} {ma['version']} ({len(ma['cases'])} cases)  B: {mb['name']} {mb['version']} ({len(mb['cases'])} cases)")
    for kind, ids in changes.items():
        typer.echo(f"{kind}: {len(ids)}")
        for case_id in ids:
            typer.echo(f"  {case_id}")
    if not any(changes.values()):
        typer.echo("identical")


@msic_app.command("check-overlap")
def check_overlap_cmd(
    msic: Path = typer.Argument(..., help="An MSIC folder."),
    training: Path = typer.Argument(..., help="A published training dataset folder."),
    spec: Optional[Path] = typer.Option(None, help="Benchmark spec whose clip and dino roles and msic.overlap_clip / "
                                                   "overlap_dino the near-duplicate check uses (default: the spec.yaml "
                                                   "of the MSIC's build folder)."),
    exact_only: bool = typer.Option(False, "--exact-only", help="Compare content hashes only (no model loads)."),
) -> None:
    """Fail (exit 1) naming every benchmark item that is in the training set: the same content hash,
    or a target or reference whose CLIP and DINO embeddings nearly duplicate a training image's."""
    from data_specs.roles import SpecError
    from tasks.publishing.msic import OverlapError, check_overlap, embedders, read_benchmark_cases
    from tasks.stages import load_build_spec

    try:
        cases = read_benchmark_cases(msic)
        built = None
        if not exact_only:
            spec = spec or msic / ".." / "spec.yaml"
            if not spec.exists():
                raise FileNotFoundError(f"no spec at {spec}: pass --spec (the benchmark's spec) or --exact-only")
            built = load_build_spec(spec)
            if built.msic is None:
                raise SpecError(f"{spec}: not a benchmark spec (no `msic` section)")
    except (SpecError, FileNotFoundError, ValueError) as error:
        fail(error)
    if built is not None:
        quiet_model_progress_bars()
    try:
        report = check_overlap(cases, training, embedders(built) if built else None, built.msic if built else None)
    except OverlapError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1)
    except FileNotFoundError as error:
        fail(error)
    typer.echo(f"no overlap: {len(cases)} cases against {training} (content hashes"
               + (")" if built is None else
                  f"; near-duplicates: centred CLIP >= {built.msic.overlap_clip} and DINO >= {built.msic.overlap_dino}, "
                  + "; ".join(f"{kind}s {s['benchmark_images']} x {s['training_images']}, highest CLIP {s['max_clip']} "
                              f"DINO {s['max_dino']}" for kind, s in report["compared"].items()) + ")"))
