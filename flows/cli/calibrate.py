"""`music calibrate`: build a spec's first N sources into a folder of their own with the build flow,
then print per-stage keep rates and the distribution behind every threshold (tasks.calibrate)."""
from __future__ import annotations

from pathlib import Path

import typer

from flows.cli.shared import BUSY_EXIT, fail, fail_lines, refuse_failed_preflight, refuse_if_building, start_server


def calibrate_command(
    spec: Path = typer.Argument(..., help="Build spec YAML (e.g. data_specs/music_10k.yaml)."),
    sources: int = typer.Option(..., "--sources", min=1, help="Source images to build (the spec's first N; no target)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for another run building into the calibration folder (default: exit 3)."),
) -> None:
    """A small build of the spec (its first N sources, into <output_root>/<name>-calibrate-<N>/, never
    the full build's folder), then keep rates per stage and, per threshold, the score distribution
    (quantiles, the share the spec's value drops) as markdown, JSON and PNG histograms."""
    import yaml

    from data_specs.build import load_build_spec
    from data_specs.roles import SpecError
    from tasks.calibrate import calibration_spec

    try:
        calibration = calibration_spec(load_build_spec(spec), sources)  # a bad spec fails here, before any server or model
    except (SpecError, FileNotFoundError, ValueError) as error:
        fail(error)
    refuse_if_building(calibration, wait)
    refuse_failed_preflight(calibration)
    # The flow reads its spec from a file: the calibration spec, beside its build folder.
    path = Path(calibration.output_root) / f"{calibration.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(calibration.model_dump(mode="json"), sort_keys=False))
    start_server()
    from flows.build import build_training_set
    from tasks.calibrate import calibration_report, text_table
    from tasks.engine import BuildLocked, build_dir
    from tasks.preflight import PreflightError

    typer.echo(f"Calibration build of {sources} sources: {build_dir(calibration).resolve()} (spec {path.resolve()})")
    try:
        result = build_training_set(str(path), False, wait)
    except BuildLocked as error:  # another run took the folder between the check and the flow
        fail(error, BUSY_EXIT)
    except PreflightError as error:  # the hub or the folder changed since the check
        fail_lines(error.problems)
    report = calibration_report(calibration, sources)
    typer.echo(f"Built {result['samples']} samples in {result['wall_seconds']:.1f} s ({result['task_runs']} task runs)")
    typer.echo("")
    typer.echo(text_table(report))
    typer.echo("")
    typer.echo(f"table: {report['table']}")
    typer.echo(f"json: {report['json']}")
    typer.echo(f"plot: {report['plot']}")
    typer.echo(f"preview sheets: {report['preview_dir']} ({len(report['preview'])} sheets)")
