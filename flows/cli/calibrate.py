"""`music calibrate`: build a spec's first N sources into a folder of their own with the build flow,
then print per-stage keep rates and the distribution behind every threshold (tasks.checks.calibrate); with
`--vary`, once per value of one field, side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli.shared import BUSY_EXIT, fail, fail_lines, refuse_failed_preflight, refuse_if_building, start_server


def calibrate_command(
    spec: Path = typer.Argument(..., help="Build spec YAML (e.g. data_specs/music_10k.yaml)."),
    sources: int = typer.Option(..., "--sources", min=1, help="Source images to build (the spec's first N; no target)."),
    vary: Optional[str] = typer.Option(None, "--vary", help="section.field=a,b: build a variant per value (sharing the stages "
                                       "before the field's) and compare them, e.g. rerender.render_size=512,1024."),
    wait: bool = typer.Option(False, "--wait", help="Wait for another run building into the calibration folder (default: exit 3)."),
) -> None:
    """A small build of the spec (its first N sources, into <output_root>/<name>-calibrate-<N>/, never
    the full build's folder), then keep rates per stage and, per threshold, the score distribution
    (quantiles, the share the spec's value drops) as markdown, JSON and PNG histograms. With --vary,
    one build per value into that folder, each variant's report, then model-seconds per published
    sample side by side."""
    import yaml

    from data_specs.roles import SpecError
    from tasks.checks.calibrate import calibration_spec, parse_vary, shared_stages, variant_label, variant_spec
    from tasks.stages import load_build_spec

    try:  # a bad spec or --vary fails here, before any server or model
        calibration = calibration_spec(load_build_spec(spec), sources)
        field, values = parse_vary(vary) if vary else (None, [None])
        variants = [variant_spec(calibration, field, value) if field else calibration for value in values]
    except (SpecError, FileNotFoundError, ValueError) as error:
        fail(error)
    refuse_if_building(calibration, wait)
    for variant in variants:
        refuse_failed_preflight(variant)
    start_server()
    from flows.build import build_training_set
    from tasks.checks.calibrate import calibration_report, text_table, variants_table
    from tasks.checks.preflight import PreflightError
    from tasks.engine.build_lock import BuildLocked
    from tasks.engine.build_paths import build_dir

    if field:
        shared = shared_stages(variants)
        typer.echo(f"{len(variants)} variants of {field}: {', '.join(map(str, values))}; stages made once and shared: "
                   f"{', '.join(shared) or 'none'}")
    compared = []
    for value, variant in zip(values, variants):
        label = variant_label(field, value) if field else None
        # The flow reads its spec from a file: the variant's, beside its build folder.
        path = Path(variant.output_root) / (f"{variant.name}.yaml" if not label else f"{variant.name}.{label}.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(variant.model_dump(mode="json"), sort_keys=False))
        typer.echo(f"Calibration build of {sources} sources{f' ({label})' if label else ''}: {build_dir(variant).resolve()} "
                   f"(spec {path.resolve()})")
        try:
            result = build_training_set(str(path), False, wait)
        except BuildLocked as error:  # another run took the folder between the check and the flow
            fail(error, BUSY_EXIT)
        except PreflightError as error:  # the hub or the folder changed since the check
            fail_lines(error.problems)
        report = calibration_report(variant, sources, label)  # before the next variant publishes over dataset/
        typer.echo(f"Built {result['samples']} samples in {result['wall_seconds']:.1f} s ({result['task_runs']} task runs)")
        typer.echo("")
        typer.echo(text_table(report))
        typer.echo("")
        typer.echo(f"table: {report['table']}")
        typer.echo(f"json: {report['json']}")
        typer.echo(f"plot: {report['plot']}")
        typer.echo(f"preview sheets: {report['preview_dir']} ({len(report['preview'])} sheets)")
        typer.echo("")
        compared.append({"value": value, "samples": result["samples"], "sources": sources, "task_runs": result["task_runs"],
                         "cost": result["model_seconds_per_sample"]})
    if field:
        typer.echo(variants_table(field, compared, shared))
