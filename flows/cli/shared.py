"""What the `music` command and its sub-command modules share: the one-line error exit, starting the
Prefect server, the preflight check, quieting model progress bars. `main.py` assembles the sub-command modules (`eval`,
`calibrate`, `msic`, `model`, `plan`, `show`); they and it import this module, and it imports none of them."""
from __future__ import annotations

from typing import NoReturn

import typer

BUSY_EXIT = 3  # another run is building into the same output folder
GATE_EXIT = 4  # the rebuild's release failed its quality gates (kept as a rejected candidate)


def fail(error: Exception | str, code: int = 2) -> NoReturn:
    """Exit `code` (2: a bad spec, input or option) with one line naming the problem."""
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(code)


def refuse_if_building(spec, wait: bool) -> None:
    """Exit at once, naming the holder, when another run builds into this spec's folder (unless
    `wait`: the flow then waits for it). Checked before the server starts, so it takes a second."""
    from tasks.engine.build_lock import busy_message, lock_holder
    from tasks.engine.build_paths import build_dir
    from tasks.engine.faults import operational_exit

    with operational_exit(build_dir(spec)):  # the lock is the build's first write: a read-only folder stops here
        holder = None if wait else lock_holder(spec)
    if holder:
        fail(busy_message(spec, holder), BUSY_EXIT)


def refuse_failed_preflight(spec) -> None:
    """Exit 2 with one line per problem when the spec's models, the disk or the folder's recorded
    commits would stop the build (`tasks.checks.preflight`): before the server starts or a task runs.
    Its notes (what runs, but slower) are printed."""
    from tasks.checks.preflight import check_against_folder

    result, problems = check_against_folder(spec)
    if problems:
        fail_lines(problems)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)


def fail_lines(problems: list[str], code: int = 2) -> NoReturn:
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    raise typer.Exit(code)


def start_server(loads_models: bool = True) -> None:
    """Start (or reuse) the local Prefect server and print its UI address. Call it before anything
    imports prefect, which reads its settings at import."""
    from flows.ops.server import ensure_server, ui_url

    typer.echo(f"Prefect UI: {ui_url(ensure_server())}")
    if loads_models:
        quiet_model_progress_bars()


def quiet_model_progress_bars() -> None:
    """Per-file weight-loading bars drown the run's own progress lines (music_model.noise)."""
    import diffusers  # noqa: F401  imported here so that their switches are turned off now
    import transformers  # noqa: F401

    from music_model.noise import quiet_progress_bars

    quiet_progress_bars()
