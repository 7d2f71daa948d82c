"""`music diff` and `music release`: the releases of a spec's published set (`tasks.publishing.releases`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows.cli.shared import BUSY_EXIT, fail

release_app = typer.Typer(help="Releases of a spec's published set: list, promote a rejected one, roll back.", no_args_is_help=True)


def _folder(spec: Path) -> tuple[object, Path]:
    """The parsed spec and its published folder (dataset/ or, for a benchmark, msic/)."""
    from data_specs.roles import SpecError
    from tasks.checks.clean import published_folder
    from tasks.stages import load_build_spec

    try:
        parsed = load_build_spec(spec)
    except (SpecError, FileNotFoundError, ValueError) as error:
        fail(error)
    return parsed, published_folder(parsed)


def diff_command(
    spec: Path = typer.Argument(..., help="The build spec."),
    a: Optional[str] = typer.Argument(None, help="The older release (default: B's parent)."),
    b: Optional[str] = typer.Argument(None, help="The newer release (default: the current one)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the diff as JSON here."),
) -> None:
    """Samples added, removed and changed between two releases (with causes), keep rates, mix and score quantiles."""
    from tasks.publishing.releases import ReleaseError, diff_between, diff_lines

    parsed, folder = _folder(spec)
    try:
        change = diff_between(folder, parsed.score_columns, a, b)
    except ReleaseError as error:
        fail(error)
    if json_out:
        json_out.write_text(json.dumps(change, indent=1))
    for line in diff_lines(change, limit=50):
        typer.echo(line)


@release_app.command("list")
def list_releases(spec: Path = typer.Argument(..., help="The build spec.")) -> None:
    """Every release: version, parent, status, samples, time; the current one marked."""
    from tasks.publishing.releases import current, releases

    _, folder = _folder(spec)
    now = (current(folder) or {}).get("version")
    for record in releases(folder):
        gates = f"  failed: {'; '.join(record['failed_gates'])}" if record["failed_gates"] else ""
        typer.echo(f"{'*' if record['version'] == now else ' '} {record['version']:5s} parent {record['parent'] or '-':5s} "
                   f"{record['status']:9s} {record['samples']:6d} samples  {record['time']}{gates}")


def _swap(spec: Path, action) -> None:
    from tasks.engine.build_lock import build_lock, lock_holder
    from tasks.publishing.releases import ReleaseError

    parsed, folder = _folder(spec)
    if holder := lock_holder(parsed):
        fail(f"{folder.parent} is being built by another run ({holder}): try when that run ends", BUSY_EXIT)
    try:
        with build_lock(parsed, {"what": "music release"}):
            result = action(folder)
    except ReleaseError as error:
        fail(error)
    typer.echo(f"{folder}: release {result['release']['version']} is current ({result['release']['samples']} samples)")


@release_app.command("promote")
def promote(spec: Path = typer.Argument(..., help="The build spec."),
            version: str = typer.Argument(..., help="The release to accept and make current, e.g. v3.")) -> None:
    """Accept a release by hand (e.g. one its gates rejected) and make it current."""
    from tasks.publishing.releases import promote as promote_release

    _swap(spec, lambda folder: promote_release(folder, version))


@release_app.command("rollback")
def rollback(spec: Path = typer.Argument(..., help="The build spec.")) -> None:
    """Make the current release's parent current again."""
    from tasks.publishing.releases import rollback as rollback_release

    _swap(spec, rollback_release)
