"""`build_msic`: the training-set stages (no copy of their logic) run with a benchmark spec, then
the benchmark is selected, checked for overlap with a training set and published."""
from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.build import lock_holder_record, publish_once, run_stages
from flows.ops.alerts import GateFailed, announce, release_lines
from flows.ops.monitor import on_flow_running
from flows.run_names import artifact_key, run_name
from flows.runners import default_task_runner
from tasks.checks.preflight import preflight
from tasks.engine.build_lock import build_lock
from tasks.engine.build_paths import build_dir
from tasks.engine.faults import operational_exit
from tasks.engine.image_store import DamagedImage
from tasks.publishing import releases
from tasks.publishing.msic import msic_fingerprint, publish_msic, published_msic
from tasks.publishing.publish import preview_markdown
from tasks.stages import load_build_spec, spec_from_json


@task(name="publish-msic", task_run_name="publish-msic-{version}")
def publish_msic_task(spec_json: str, filter_dir: str, shards: int, version: str, fingerprint: str) -> dict:
    """The result, or `{"damaged": <image>}` (see `publish_redoing_damaged`)."""
    spec = spec_from_json(spec_json)
    with operational_exit(build_dir(spec)):
        try:
            return publish_msic(spec, Path(filter_dir), shards, fingerprint)
        except DamagedImage as error:
            return {"damaged": error.relative}


@flow(name="build-msic", flow_run_name=run_name("msic"), log_prints=True, task_runner=default_task_runner(),
      on_running=[on_flow_running])
def build_msic(spec_path: str, verify: bool = False, wait: bool = False) -> dict:
    """Regenerate the MSIC benchmark from a spec with an `msic` section (an unchanged rerun does
    nothing: no task run, no contamination scan). `verify` and `wait` as in build-training-set."""
    logger = get_run_logger()
    started = time.perf_counter()
    spec = load_build_spec(spec_path)
    if spec.msic is None:
        raise ValueError(f"{spec_path}: not a benchmark spec (it has no `msic` section)")
    with operational_exit(build_dir(spec)), build_lock(spec, lock_holder_record("msic"), wait, logger.info):
        spec = preflight(spec)  # before any task: every model loadable, the disk enough, the commits the folder's
        run = run_stages(spec, verify)
        fingerprint = msic_fingerprint(spec, run.upstream, run.shards)
        folder = build_dir(spec).resolve() / "msic"
        before = (releases.current(folder) or {}).get("version")
        result = publish_once(spec, run, verify, lambda: published_msic(spec, fingerprint), lambda: publish_msic_task(
            run.spec_json, str(run.upstream_dir), run.shards, spec.msic.version, fingerprint))
    announce(spec.name, folder, result, before, artifact_key(spec.name, "release"))
    if result["release"]["status"] == "rejected":
        raise GateFailed("\n".join(release_lines(spec.name, "msic", result["release"])))
    counts = [{"subjects": k, "cases": v} for k, v in result["counts"].items()]
    create_table_artifact(counts, key=artifact_key(spec.name, "msic-cases"), description="MSIC cases per subject count")
    create_markdown_artifact("\n".join([
        f"# MSIC {spec.msic.version}: {spec.name}\n\n- cases: {result['cases']}\n- output: {result['msic']}\n"
        f"- per subject count: {result['counts']}\n", *preview_markdown(Path(result["msic"]), result.get("preview", []), inline=True)]),
        key=artifact_key(spec.name, "msic-report"))
    logger.info("published %d MSIC cases to %s", result["cases"], result["msic"])
    return {**result, "task_runs": run.task_runs, "stages": run.tables, "wall_seconds": round(time.perf_counter() - started, 2),
            "model_loads": sum(t["model_loads"] for t in run.tables)}
