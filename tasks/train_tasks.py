"""The MUSIC model's work as plain functions over one unit (a training run, a shard of benchmark
cases or subjects) plus their Prefect task wrappers: train, generate MSIC candidates, generate
DreamBench images, and the loss plot. The plain functions need no Prefect.

Generation writes under `<run>/generated/`::

    msic/images/<case_id>/<k>.png                 candidates of each MSIC case
    msic/parts/part-00003.{cases,generation}.parquet, part-00003.done.json   one shard, marker last
    msic/cases.parquet                            the scoring code's cases table (data_specs.eval.CASES)
    msic/generation.parquet                       seeds, planner output, plan, repairs per candidate
    dreambench/images/<subject>/<PP>_<K>.png      the DreamBench naming convention
    dreambench/parts/...                          per-shard generation records and markers
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from data_specs.eval import CASES
from data_specs.train import TrainSpec
from music_model.music.model import GENERATION, generate_dreambench_images, generate_msic_shard, load_model, read_msic_cases
from music_model.music.training import read_history, train
from safe_files import write_atomic
from tasks.contract import write_table
from tasks.faults import stops_on_fault
from tasks.markers import run_marked, shard_marker, shard_name

MAX_PLOTTED = 2000


def plot_losses(history: list[dict], path: Path) -> None:
    """Planner, renderer and weighted total loss per optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    stride = max(1, math.ceil(len(history) / MAX_PLOTTED))
    points = history[::stride]
    for key, label in (("loss", "weighted total"), ("planner", "planner CE (plan tokens)"), ("renderer", "renderer flow matching")):
        steps = [r["step"] for r in points if r.get(key) is not None]
        if steps:
            ax.plot(steps, [r[key] for r in points if r.get(key) is not None], label=label, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("MUSIC LoRA training")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def train_run(spec_json: str, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) the spec's run and plot its losses; returns the run summary."""
    spec = TrainSpec.model_validate_json(spec_json)
    summary = train(spec, on_step=on_step)
    plot = Path(summary["output"]) / "plots" / "loss.png"
    plot_losses(read_history(summary["output"]), plot)
    return {**summary, "plot": str(plot)}


def pass_selector(spec: TrainSpec):
    """The Pass@N selector (the eval spec's `clip_select`) when the strategy prunes, else None."""
    if spec.generation.strategy not in ("prune", "screen_prune"):
        return None
    from data_specs.eval import load_eval_spec
    from data_specs.train import resolve_spec_path
    from music_model.roles import load_role
    from music_model.scoring.metrics import Scorer

    return Scorer(None, None, load_role(load_eval_spec(resolve_spec_path(spec.evaluation.eval_spec)).roles["clip_select"])).selection_scores


def generate_msic_part(spec_json: str, adapters: str | None, cases_path: str, start: int, stop: int, shard: int, out_dir: str) -> dict:
    """Candidates for MSIC cases [start, stop): images, the cases-table rows and the seeds, then a marker."""
    out = Path(out_dir)

    def generated() -> tuple[dict, list[Path]]:
        spec = TrainSpec.model_validate_json(spec_json)
        rows, records = generate_msic_shard(load_model(spec, adapters), read_msic_cases(cases_path, start, stop), out,
                                            spec.generation.candidates, spec.generation.seed, spec.generation, pass_selector(spec))
        outputs = [out / "parts" / f"{shard_name(shard)}.cases.parquet", out / "parts" / f"{shard_name(shard)}.generation.parquet"]
        write_table(rows, CASES, outputs[0])
        write_table(records, GENERATION, outputs[1])
        return {"shard": shard, "cases": len(rows), "images": len(records), "plans_repaired": sum(bool(r["repairs"]) for r in records),
                "plans_rejected": sum(r["plan_error"] is not None for r in records)}, outputs

    return run_marked(shard_marker(out / "parts", shard), generated)


def merge_msic_parts(out_dir: str, shards: int) -> dict:
    """The shards' tables as one cases table (its image paths relative to it) and one generation table."""
    out = Path(out_dir)
    merged = {}
    for kind, schema in (("cases", CASES), ("generation", GENERATION)):
        tables = [pq.read_table(out / "parts" / f"{shard_name(k)}.{kind}.parquet", schema=schema) for k in range(shards)]
        path = out / f"{kind}.parquet"
        table = pa.concat_tables(tables)
        write_atomic(path, lambda tmp, t=table: pq.write_table(t, tmp, compression="zstd"))
        merged[kind] = str(path)
    return merged


def generate_dreambench_part(spec_json: str, adapters: str | None, bench_root: str, images_dir: str, subjects: list[str],
                             prompt_indices: list[int], shard: int, out_dir: str) -> dict:
    """The DreamBench grid cells of `subjects` that have no image yet, plus their generation records."""
    from music_model.scoring.dreambench import load_dreambench

    out = Path(out_dir)

    def generated() -> tuple[dict, list[Path]]:
        spec = TrainSpec.model_validate_json(spec_json)
        bench = load_dreambench(bench_root, check_images=False)
        counts, records = generate_dreambench_images(load_model(spec, adapters), bench, Path(images_dir), subjects, prompt_indices,
                                                     spec.generation.candidates, spec.generation.seed)
        outputs = [out / "parts" / f"{shard_name(shard)}.generation.parquet"]
        write_table(records, GENERATION, outputs[0])
        return {"shard": shard, "subjects": subjects, **counts}, outputs

    return run_marked(shard_marker(out / "parts", shard), generated)


# --- Prefect task wrappers ------------------------------------------------------------------------------


@task(name="train-music", task_run_name="train-{name}")
@stops_on_fault
def train_task(spec_json: str, name: str, progress_id: str | None = None, total_steps: int | None = None) -> dict:
    from prefect.artifacts import update_progress_artifact

    shown = {"percent": -1}

    def on_step(record: dict) -> None:  # one API call per whole percent, not per step
        percent = int(100 * record["step"] / total_steps) if total_steps else 0
        if progress_id and percent > shown["percent"]:
            update_progress_artifact(progress_id, min(100.0, float(percent)))
            shown["percent"] = percent

    return train_run(spec_json, on_step)


@task(name="generate-msic", task_run_name="generate-msic-shard-{shard:05d}")
@stops_on_fault
def generate_msic_task(spec_json: str, adapters: str | None, cases_path: str, start: int, stop: int, shard: int, out_dir: str) -> dict:
    return generate_msic_part(spec_json, adapters, cases_path, start, stop, shard, out_dir)


@task(name="generate-dreambench-music", task_run_name="generate-dreambench-shard-{shard:05d}")
@stops_on_fault
def generate_dreambench_task(spec_json: str, adapters: str | None, bench_root: str, images_dir: str, subjects: list[str],
                             prompt_indices: list[int], shard: int, out_dir: str) -> dict:
    return generate_dreambench_part(spec_json, adapters, bench_root, images_dir, subjects, prompt_indices, shard, out_dir)
