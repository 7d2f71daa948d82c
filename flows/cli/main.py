"""The `music` command line."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from flows.cli.calibrate import calibrate_command
from flows.cli.eval import eval_app
from flows.cli.model import generate_app, pipeline_command, train_command
from flows.cli.msic import msic_app
from flows.cli.plan import plan_command
from flows.cli.release import diff_command, release_app
from flows.cli.shared import BUSY_EXIT, GATE_EXIT, fail, fail_lines, refuse_failed_preflight, refuse_if_building, start_server
from flows.cli.show import show

app = typer.Typer(help="MUSIC pipeline: data generation, MSIC benchmark, scoring and training.", no_args_is_help=True)
zoo_app = typer.Typer(help="The tiny model zoo (deterministic random checkpoints for every role).", no_args_is_help=True)
roles_app = typer.Typer(help="Model roles.", no_args_is_help=True)
server_app = typer.Typer(help="The local Prefect server (127.0.0.1; SQLite in the state folder, or --database-url).",
                         invoke_without_command=True)
app.add_typer(zoo_app, name="zoo")
app.add_typer(roles_app, name="roles")
app.add_typer(server_app, name="server")
app.add_typer(eval_app, name="eval")
app.add_typer(msic_app, name="msic")
app.command("train")(train_command)
app.command("pipeline")(pipeline_command)
app.add_typer(generate_app, name="generate")
app.command("plan")(plan_command)
app.command("calibrate")(calibrate_command)
app.command("show")(show)
app.command("diff")(diff_command)
app.add_typer(release_app, name="release")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", help="Show the library messages filtered as known and harmless "
                                      "(warnings, progress bars, Prefect's hook lines); set for every process it starts.")) -> None:
    import os

    from music_model import settings
    from music_model.noise import quiet_progress_bars

    if verbose:
        os.environ[settings.VERBOSE.name] = "1"
    quiet_progress_bars()


@zoo_app.command("build")
def zoo_build(
    dir: Optional[Path] = typer.Option(None, "--dir", help="Zoo folder (default: $MUSIC_ZOO_DIR or <state>/zoo)."),
    force: bool = typer.Option(False, help="Rebuild entries that already exist."),
    only: Optional[list[str]] = typer.Option(None, help="Build only these entries."),
) -> None:
    """Build the tiny zoo and write its manifest of content hashes."""
    from music_model.paths import folder_bytes, zoo_dir
    from music_model.zoo import ENTRIES, ensure_entry, write_manifest

    root = dir or zoo_dir()
    unknown = [name for name in only or [] if name not in ENTRIES]
    if unknown:
        raise typer.BadParameter(f"unknown zoo entries {unknown}; known: {', '.join(sorted(ENTRIES))}", param_hint="--only")
    total_start = time.perf_counter()
    for name in only or sorted(ENTRIES):
        start = time.perf_counter()
        path = ensure_entry(name, root, force)
        typer.echo(f"{name:16s} {folder_bytes(path) / 1e6:7.2f} MB  {time.perf_counter() - start:6.2f} s")
    manifest = write_manifest(root)
    typer.echo(f"zoo: {root}  {folder_bytes(root) / 1e6:.2f} MB  {time.perf_counter() - total_start:.1f} s  manifest: {manifest}")


@zoo_app.command("list")
def zoo_list() -> None:
    """Zoo entries and whether they are built."""
    from music_model.paths import zoo_dir
    from music_model.zoo import ENTRIES

    for name in sorted(ENTRIES):
        built = (zoo_dir() / name / "zoo_entry.json").exists()
        typer.echo(f"{name:16s} {'built' if built else '-'}")


@roles_app.command("check")
def roles_check(
    spec: Optional[Path] = typer.Argument(None, help="A build spec: preflight its roles and disk without loading a model."),
    device: Optional[str] = typer.Option(None, help="Override every role's device (cpu, cuda, cuda:N)."),
    dtype: Optional[str] = typer.Option(None, help="Override every role's dtype (float32, bfloat16, float16)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the rows as JSON here."),
) -> None:
    """With SPEC: the build's preflight (every model found, reachable and accessible, its commit, its
    licence; the disk), loading nothing. Without: load every role x backend from the zoo and run a
    batch of 2 through it, with timings."""
    if spec is not None:
        return preflight_roles(spec, json_out)
    from music_model.roles.smoke import check_roles, zoo_role_specs

    rows = check_roles(zoo_role_specs(device, dtype))
    for row in rows:
        timing = f"load {row['load_s']:6.2f} s  batch {row['batch_s']:6.2f} s" if row["ok"] else "FAILED"
        typer.echo(f"{row['name']:28s} {row['backend']:16s} {row.get('device', '-'):6s} {row.get('dtype', '-'):8s} {timing}  {row['output']}")
    if json_out:
        json_out.write_text(json.dumps(rows, indent=1))
    if not all(row["ok"] for row in rows):
        raise typer.Exit(1)


def preflight_roles(spec: Path, json_out: Optional[Path]) -> None:
    from data_specs.roles import SpecError
    from tasks.checks.preflight import check_against_folder
    from tasks.stages import load_build_spec

    try:
        parsed = load_build_spec(spec)
    except (SpecError, FileNotFoundError, ValueError) as error:
        fail(error)
    result, problems = check_against_folder(parsed)
    for role in result.roles:
        commit = role.commit[:12] if role.commit else ("not built yet" if role.source == "zoo" else "-")
        state = "FAILED" if role.problem else "ok"
        typer.echo(f"{role.role:10s} {role.model:40s} {role.source:6s} {commit:14s} {role.licence.get('license', '-'):12s} {state}")
    typer.echo(f"disk       about {result.needed_bytes / 2**30:.2f} GiB to write, {result.free_bytes / 2**30:.2f} GiB free at {result.disk_path}")
    for note in result.notes:
        typer.echo(f"note: {note}")
    if json_out:
        json_out.write_text(json.dumps({"roles": result.record(), "problems": problems}, indent=1))
    if problems:
        fail_lines(problems, 1)


@app.command("build")
def build(
    spec: Path = typer.Argument(..., help="Build spec YAML (e.g. data_specs/tiny.yaml)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the run summary as JSON here."),
    runner: str = typer.Option("local", help="Where shard tasks run: local (bounded thread pool) or ray."),
    ray_address: Optional[str] = typer.Option(None, help="With --runner ray: the cluster's GCS address, e.g. 127.0.0.1:6379."),
    verify: bool = typer.Option(False, "--verify", help="Check the sha256 of every reused shard part and stored image, not only sizes and footers."),
    wait: bool = typer.Option(False, "--wait", help="Wait for another run building into the same folder (default: exit 3 naming it)."),
) -> None:
    """Build a training set: every stage as a Prefect DAG on the local (or $PREFECT_API_URL) server."""
    from data_specs.roles import SpecError
    from flows.runners import RunnerError, check_runner
    from tasks.stages import load_build_spec

    try:
        parsed = load_build_spec(spec)  # a bad spec fails here, before any server or model
        check_runner(runner, ray_address)
    except (SpecError, FileNotFoundError, ValueError, RunnerError) as error:
        fail(error)
    refuse_if_building(parsed, wait)
    refuse_failed_preflight(parsed)
    start_server()
    from flows.build import build_training_set
    from flows.ops.alerts import GateFailed
    from flows.runners import make_task_runner
    from tasks.checks.preflight import PreflightError
    from tasks.engine.build_lock import BuildLocked
    from tasks.engine.build_paths import build_dir

    typer.echo(f"Output: {build_dir(parsed).resolve()}")
    try:
        result = build_training_set.with_options(task_runner=make_task_runner(runner, ray_address))(str(spec), verify, wait)
    except BuildLocked as error:  # another run took the folder between the check and the flow
        fail(error, BUSY_EXIT)
    except PreflightError as error:  # the hub or the folder changed since the check
        fail_lines(error.problems)
    except GateFailed as error:  # kept as a rejected release; dataset/ is the previous one
        fail_lines(str(error).splitlines(), GATE_EXIT)
    if json_out:
        json_out.write_text(json.dumps(result, indent=1))
    for table in result["stages"]:
        typer.echo(f"  {table['stage']:10s} in {table['rows_in']:5d}  kept {table['kept']:5d}  {table['dropped_by_reason']}")
    typer.echo(f"Published {result['samples']} samples to {result['dataset']} in {result['wall_seconds']:.1f} s "
               f"({result['task_runs']} task runs, {result['model_loads']} model loads)")
    if result.get("waves"):
        typer.echo(f"Target: {result['waves'][-1]} sources made in {len(result['waves'])} waves ({', '.join(map(str, result['waves']))})")
    if result.get("short"):
        typer.echo(f"Short: {result['short']}")


@app.command("clean")
def clean(
    spec: Path = typer.Argument(..., help="The build spec whose output folder to clean."),
    yes: bool = typer.Option(False, "--yes", help="Remove what is listed (default: only list it)."),
) -> None:
    """List (with --yes remove) what the spec's build folder holds that the spec no longer uses: stage
    outputs of other fingerprints, stored images no current shard names and releases beyond the
    spec's `release.keep` (never the current one), with the bytes they free."""
    from data_specs.roles import SpecError
    from tasks.checks.clean import find_unused, remove
    from tasks.engine.build_lock import build_lock, lock_holder
    from tasks.engine.build_paths import build_dir
    from tasks.stages import load_build_spec

    try:
        parsed = load_build_spec(spec)
    except (SpecError, FileNotFoundError, ValueError) as error:
        fail(error)
    root = build_dir(parsed)
    if holder := lock_holder(parsed):
        fail(f"{root} is being built by another run ({holder}): clean it when that run ends", BUSY_EXIT)
    unused = find_unused(parsed)
    for folder, size in unused.stale:
        typer.echo(f"  {folder.relative_to(root)}  {size:,} bytes")
    typer.echo(f"  images no current shard names: {len(unused.images)}, {sum(s for _, s in unused.images):,} bytes")
    if yes:
        with build_lock(parsed, {"what": "music clean"}):
            remove(unused)
    verb = "freed" if yes else "would free"
    typer.echo(f"{root}: {verb} {unused.bytes:,} bytes ({unused.bytes / 2**20:.1f} MiB)"
               + (" (run with --yes to remove)" if unused.bytes and not yes else ""))


@server_app.callback()
def server(
    ctx: typer.Context,
    database_url: Optional[str] = typer.Option(
        None, help="The server's database as a SQLAlchemy URL, e.g. postgresql+asyncpg://user:password@host:5432/prefect "
                   "(default: $PREFECT_API_DATABASE_CONNECTION_URL, else SQLite in the state folder)."),
) -> None:
    """Start (or reuse) the local Prefect server, print its UI address and save a `music` Prefect profile naming it."""
    if ctx.invoked_subcommand is None:
        import os

        from flows.ops.server import PROFILE, ensure_server, running_server, save_profile, ui_url

        external = os.environ.get("PREFECT_API_URL")
        try:
            api = ensure_server(database=database_url)
        except RuntimeError as error:
            fail(error)
        typer.echo(f"Prefect UI: {ui_url(api)}")
        if not external:
            typer.echo(f"Database: {(running_server() or {}).get('database', 'sqlite (the state folder)')}")
        if external:
            typer.echo("PREFECT_API_URL is set: the prefect CLI in this shell already uses that server")
            return
        path, active = save_profile(api)
        typer.echo(f"Prefect profile '{PROFILE}': PREFECT_API_URL={api} (saved in {path})")
        if active == PROFILE:
            typer.echo(f"The prefect CLI uses it: '{PROFILE}' is the active profile")
        else:
            typer.echo(f"The prefect CLI uses the '{active}' profile; to point it at this server: prefect profile use {PROFILE}")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the server this state folder started."""
    from flows.ops.server import stop_server

    typer.echo("stopped" if stop_server() else "no server of ours was running")


@app.command("deploy")
def deploy() -> None:
    """Register prefect.yaml's deployments (and their process work pools) on the server."""
    from flows.ops.server import ensure_server, ui_url

    api = ensure_server()
    from flows.ops.deploy import deployments, register

    done = register()
    if done.returncode != 0:
        typer.echo(done.stdout[-4000:] + done.stderr[-4000:], err=True)
        raise typer.Exit(done.returncode)
    from flows.ops.alerts import register_automations

    automations = register_automations()
    typer.echo(f"automations: {', '.join(automations)}" if automations else
               "automations: none (set MUSIC_ALERT_WEBHOOK or MUSIC_ALERT_BLOCK to be told of failed rebuilds and gates)")
    for row in deployments():
        typer.echo(f"{row['name']:40s} pool {row['pool']:12s} schedules {', '.join(row['schedules']) or '-':16s} next {row['next_run'] or '-'}")
    typer.echo(f"Prefect UI: {ui_url(api)}/deployments")


@app.command("worker")
def worker(
    pool: str = typer.Option("music-gpu", help="Work pool to poll (prefect.yaml's pool)."),
    gpu: Optional[str] = typer.Option(None, help="Pin the worker and its flow runs to this GPU (sets CUDA_VISIBLE_DEVICES); start one worker per GPU."),
    runner: str = typer.Option("local", help="Where its flow runs' shard tasks run: local or ray."),
    ray_address: Optional[str] = typer.Option(None, help="With --runner ray: the cluster's GCS address."),
    name: Optional[str] = typer.Option(None, help="Worker name (default: <pool>-<host>[-gpuN])."),
) -> None:
    """Start a Prefect process worker for the MUSIC deployments (stop it with SIGTERM; it ignores SIGINT)."""
    import os

    from flows.ops.server import ensure_server, ui_url
    from flows.runners import RunnerError, check_runner

    try:
        check_runner(runner, ray_address)
    except RunnerError as error:
        fail(error)
    api = ensure_server()
    from flows.ops.deploy import worker_process

    command, env = worker_process(pool, gpu, runner, ray_address, name)
    typer.echo(f"Prefect UI: {ui_url(api)}  worker: {command[-1]}  pool: {pool}  CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '(all)')}")
    os.execvpe(command[0], command, env)  # the worker takes over this process: SIGTERM reaches it directly


if __name__ == "__main__":
    app()
