"""`build_training_set`: compose -> synthesize -> detect -> verify -> rerender -> annotate ->
segment + layout -> decimate -> filter -> publish, one task run per (stage, shard)."""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, runtime, unmapped
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed

from data_specs.build import BuildSpec
from flows.ops.alerts import GateFailed, announce, release_lines
from flows.ops.monitor import on_flow_running, stop_promptly
from flows.run_names import artifact_key, run_name
from flows.runners import default_task_runner, shard_placement
from music_model.roles import release_roles
from safe_files import write_atomic
from tasks.build_tasks import enter_stage, publish_dataset, stage_shard
from tasks.checks.cost_plan import funnel
from tasks.checks.preflight import preflight
from tasks.engine.build_lock import build_lock
from tasks.engine.build_paths import build_dir
from tasks.engine.contract import num_shards, shard_input
from tasks.engine.faults import operational_exit
from tasks.engine.image_store import forget_image
from tasks.engine.markers import check_shard
from tasks.publishing import releases, waves
from tasks.publishing.publish import preview_markdown, publish_fingerprint, publishable, published_stats
from tasks.stages import load_build_spec, stage_chain


def stage_table(stage: str, results: list[dict], wall: float) -> dict:
    rows_in, rows_out = sum(r["rows_in"] for r in results), sum(r["rows_out"] for r in results)
    dropped: dict[str, int] = {}
    for result in results:
        for reason, count in result["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + count
    worked = [r for r in results if not r["skipped"]]
    seconds = sum(r["seconds"] for r in worked)
    return {
        "stage": stage, "shards": len(results), "shards_skipped": len(results) - len(worked), "rows_in": rows_in,
        "kept": rows_out, "dropped": sum(dropped.values()),
        "dropped_by_reason": ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())) or "-",
        "task_seconds": round(seconds, 2), "model_seconds": round(sum(r["model_seconds"] for r in worked), 2),
        "wall_seconds": round(wall, 2), "samples_per_s": round(sum(r["rows_in"] for r in worked) / wall, 2) if wall else 0.0,
        "model_loads": sum(r["model_loads"] for r in worked),
        "load_seconds": round(sum(r.get("load_seconds", 0.0) for r in worked), 2),
        "peak_device_gib": peak_gib(worked), "oom_retries": sum(r.get("oom_retries", 0) for r in worked),
    }


def peak_gib(results: list[dict]) -> float | None:
    """The largest accelerator memory peak of the shards, GiB; None when no shard ran on one."""
    peaks = [r["peak_device_bytes"] for r in results if r.get("peak_device_bytes") is not None]
    return round(max(peaks) / 2**30, 2) if peaks else None


def cost_per_sample(summaries: list[dict], samples: int) -> dict[str, float | None]:
    """Model-seconds (GPU-seconds on a GPU) per published sample, by stage and in all: every shard
    the published set came from counts, whichever run made it (its marker keeps its seconds)."""
    seconds: dict[str, float] = {}
    for summary in summaries:
        seconds[summary["stage"]] = seconds.get(summary["stage"], 0.0) + summary.get("model_seconds", 0.0)
    seconds["all"] = sum(seconds.values())
    return {stage: round(total / samples, 4) if samples else None for stage, total in seconds.items()}


def report(spec: BuildSpec, tables: list[dict], stats: dict, wall: float, out: Path, costs: dict[str, float | None],
           notes: list[str]) -> str:
    cost = ", ".join(f"{stage} {value}" for stage, value in costs.items() if value is not None) or "-"
    lines = [
        f"# Build report: {spec.name}", "",
        *[f"**{note}**" if note.startswith("short") else f"- {note}" for note in notes],
        f"- published samples: {stats['samples']} (from {stats['sources']} source images)",
        f"- subject counts: {stats['subject_counts']}", f"- wall time: {wall:.1f} s", f"- output: {out}",
        f"- model-seconds per published sample (GPU-seconds on a GPU; every shard counted, whichever run made it): {cost}", "",
        "| stage | shards (skipped) | in | kept | dropped by reason | task s | model s | samples/s | loads | load s | peak GiB | OOM halvings |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tables:
        lines.append(
            f"| {t['stage']} | {t['shards']} ({t['shards_skipped']}) | {t['rows_in']} | {t['kept']} | {t['dropped_by_reason']} "
            f"| {t['task_seconds']} | {t['model_seconds']} | {t['samples_per_s']} | {t['model_loads']} | {t['load_seconds']} "
            f"| {'-' if t['peak_device_gib'] is None else t['peak_device_gib']} | {t['oom_retries']} |"
        )
    publish_row = stats["funnel"][-1]
    lines += ["", f"publish: {publish_row['rows_in']} in, {publish_row['rows_out']} published, dropped {publish_row['dropped'] or '-'}",
              "", "![funnel](plots/funnel.png) ![subject counts](plots/subject_counts.png)", ""]
    return "\n".join(lines)


@dataclass
class StagesRun:
    """What running the stages left: the last stage's output and what every shard reported (a
    shard's first report in this run: done before it, or made by it, whichever wave asked)."""

    spec_json: str
    shards: int
    upstream: str
    upstream_dir: Path | None
    results: dict[str, dict[int, dict]] = field(default_factory=dict)  # stage -> shard -> marker
    walls: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds in this run
    task_runs: int = 0

    @property
    def summaries(self) -> list[dict]:
        return [result for shards in self.results.values() for _, result in sorted(shards.items())]

    @property
    def tables(self) -> list[dict]:
        return [stage_table(stage, [r for _, r in sorted(shards.items())], self.walls[stage]) for stage, shards in self.results.items()]


def lock_holder_record(what: str) -> dict:
    """Who a flow run is, for the build lock's holder file."""
    return {"what": what, "flow_run": f"{runtime.flow_run.name} ({runtime.flow_run.id})"}


def run_stages(spec: BuildSpec, verify: bool = False, shards: int | None = None, run: StagesRun | None = None) -> StagesRun:
    """Every stage over the first `shards` shards (all of them by default), resuming from completed
    shards made from the same input whose parts prove themselves (size and footer; with `verify`
    their sha256 too): a part that fails is redone, with one log line naming it. `run` carries a
    build's earlier waves. Shared by the training-set and MSIC builds; call inside a flow, under
    the build's lock."""
    logger = get_run_logger()
    out = build_dir(spec).resolve()
    write_atomic(out / "spec.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)))
    shards = num_shards(spec) if shards is None else shards
    chain = stage_chain(spec)
    run = run or StagesRun(spec.model_dump_json(), shards, chain[-1].fingerprint, chain[-1].folder)
    run.shards = shards
    with stop_promptly(), shard_placement() as placement:
        for link in chain:
            stage, fp, upstream_dir = link.stage, link.fingerprint, link.upstream_dir
            enter_stage(spec, stage.name)  # the registry frees the models this stage does not use
            stage_start = time.perf_counter()
            progress = create_progress_artifact(0.0, key=artifact_key(spec.name, stage.name, "progress"),
                                                description=f"{stage.name}: shards done of {shards}")
            # Completed shards are read from their markers: a rerun submits task runs only for work.
            seen = run.results.setdefault(stage.name, {})
            results = []
            for k in range(shards):
                marker, problem = check_shard(spec, stage.name, fp, k, verify, shard_input(spec, k, upstream_dir))
                if problem:
                    logger.warning(problem)
                if marker:
                    results.append(seen.get(k, marker))
            done = {r["shard"] for r in results}  # built once: a set per shard is quadratic in the shards
            todo = [k for k in range(shards) if k not in done]
            task_placement, submitting = placement.for_stage(stage.name, len(todo))
            with submitting:
                futures = stage_shard.with_options(tags=[f"stage:{stage.name}"]).map(
                    stage_name=unmapped(stage.name), spec_json=unmapped(run.spec_json), shard=todo,
                    fingerprint=unmapped(fp), upstream_dir=unmapped(str(upstream_dir) if upstream_dir else None),
                    placement=unmapped(task_placement),
                ) if todo else []
            for future in as_completed(futures):
                results.append(future.result())
                update_progress_artifact(progress, 100.0 * len(results) / shards)
            update_progress_artifact(progress, 100.0)
            run.task_runs += len(todo)
            seen.update((r["shard"], r) for r in results)
            run.walls[stage.name] = run.walls.get(stage.name, 0.0) + time.perf_counter() - stage_start
            table = stage_table(stage.name, [seen[k] for k in range(shards)], run.walls[stage.name])
            create_table_artifact([table], key=artifact_key(spec.name, stage.name),
                                  description=f"{stage.name}: kept, dropped by reason, time, throughput")
            logger.info("%-10s kept %d of %d (%s) in %.1f s", stage.name, table["kept"], table["rows_in"],
                        table["dropped_by_reason"], time.perf_counter() - stage_start)
    release_roles()
    run.upstream, run.upstream_dir = chain[-1].fingerprint, chain[-1].folder
    return run


# A stored image found damaged again after its shard was redone: the disk itself is failing.
DAMAGED_REDOS = 3


def publish_redoing_damaged(spec: BuildSpec, run: StagesRun, verify: bool, publish) -> dict:
    """`publish()`'s result; when it found a stored image damaged (its bytes are not its name's), the
    image and the markers of the shards that made it go, those shards are redone and it publishes again."""
    logger = get_run_logger()
    for _ in range(DAMAGED_REDOS):
        result = publish()
        if "damaged" not in result:
            return result
        logger.warning(forget_image(build_dir(spec), result["damaged"]))
        run_stages(spec, verify, run.shards, run)
    raise RuntimeError(f"{result['damaged']} was damaged again after {DAMAGED_REDOS} redos of the shards that made it: "
                       f"check the disk under {build_dir(spec)}")


def publish_once(spec: BuildSpec, run: StagesRun, verify: bool, published: Callable[[], dict | None],
                 publish: Callable[[], dict]) -> dict:
    """The one place a build asks whether it is published: `published()`, the result its publish
    fingerprint already made (an unchanged rebuild runs no publish task and makes no release), else
    `publish()`'s as `publish_redoing_damaged` runs it, counted as one task run. Shared by the
    training-set and MSIC builds; call under the build's lock."""
    if (result := published()) is not None:
        return result
    result = publish_redoing_damaged(spec, run, verify, publish)
    run.task_runs += 1
    return result


def run_waves(spec: BuildSpec, verify: bool = False) -> tuple[StagesRun, list[int], list[dict]]:
    """Build to the spec's target (`tasks.publishing.waves`): waves of sources until the target is met or the
    ceiling reached; the run, the sources made after each wave and the publishable index rows."""
    logger = get_run_logger()
    prior = funnel(spec)["per_source_by_count"]
    sources, made, run = waves.first_wave(spec, prior), [], None
    while True:
        run = run_stages(spec, verify, -(-sources // spec.shard_size), run)
        made.append(sources)
        rows = publishable(spec, run.upstream_dir, run.shards)
        counts = Counter(row["num_subjects"] for row in rows)
        following = waves.next_wave(spec, sources, counts, prior)
        logger.info("wave %d: %d sources made; publishable by subject count %s; target %s; %s", len(made), sources,
                    dict(sorted(counts.items())), waves.wanted(spec),
                    "next wave to %d sources" % following if following > sources else "done")
        if following == sources:
            return run, made, rows
        sources = following


@flow(name="build-training-set", flow_run_name=run_name("build"), log_prints=True,
      task_runner=default_task_runner(), on_running=[on_flow_running])
def build_training_set(spec_path: str, verify: bool = False, wait: bool = False) -> dict:
    """Run every stage over every shard of the spec, then publish the dataset. One build per output
    folder at a time: another run of it fails at once naming the holder, or with `wait` waits.
    `verify`: check the sha256 of every reused part, not only its size and footer."""
    logger = get_run_logger()
    started = time.perf_counter()
    spec = load_build_spec(spec_path)
    with operational_exit(build_dir(spec)), build_lock(spec, lock_holder_record("build"), wait, logger.info):
        spec = preflight(spec)  # before any task: every model loadable, the disk enough, the commits the folder's
        if spec.target is None:
            run, made, short = run_stages(spec, verify), None, None
        else:
            run, made, rows = run_waves(spec, verify)
            short = waves.short_of_target(spec, Counter(r["num_subjects"] for r in rows), made[-1])
        publish_fp = publish_fingerprint(spec, run.upstream, run.shards)
        dataset = build_dir(spec).resolve() / "dataset"
        before = (releases.current(dataset) or {}).get("version")
        stats = publish_once(spec, run, verify, lambda: published_stats(spec, publish_fp), lambda: publish_dataset(
            run.spec_json, str(run.upstream_dir), run.shards, run.summaries, publish_fp, made))
        announce(spec.name, dataset, stats, before, artifact_key(spec.name, "release"))
        if stats["release"]["status"] == "rejected":  # dataset/ and its report stay the current release's
            raise GateFailed("\n".join(release_lines(spec.name, "dataset", stats["release"])))
        wall = time.perf_counter() - started
        costs = cost_per_sample(run.summaries, stats["samples"])
        short_line = short.line(spec) if short else None
        notes = [short_line] if short_line else []
        if spec.target is not None:
            enough = waves.sufficed(spec, rows)
            overshoot = f"; overshoot {made[-1] - enough} sources ({made[-1] / enough:.2f}x)" if enough else ""
            notes.append(f"sources made {made[-1]} in {len(made)} waves ({', '.join(map(str, made))}); the fewest that would have "
                         f"sufficed, known only now: {enough if enough is not None else 'more than were made'}{overshoot}")
        text = report(spec, run.tables, stats, wall, dataset, costs, notes)
        previews = stats.get("preview", [])
        write_atomic(dataset / "report.md", lambda tmp: tmp.write_text("\n".join([text, *preview_markdown(dataset, previews)])))
        create_markdown_artifact("\n".join([text, *preview_markdown(dataset, previews, inline=True)]),
                                 key=artifact_key(spec.name, "report"), description=f"build report of {spec.name}")
    if short_line:
        logger.warning(short_line)
    logger.info("published %d samples to %s", stats["samples"], dataset)
    return {"dataset": str(dataset), "samples": stats["samples"], "release": stats["release"], "task_runs": run.task_runs, "wall_seconds": round(wall, 2),
            "model_loads": sum(t["model_loads"] for t in run.tables), "stages": run.tables, "funnel": stats["funnel"],
            "waves": made, "short": short_line, "model_seconds_per_sample": costs}
