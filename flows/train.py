"""`train`: LoRA training of the MUSIC model (planner + renderer) as a Prefect flow.

One task run trains (or resumes) the spec's run; the flow publishes a progress artifact while it
runs, then the loss curve as a table artifact (per step: planner CE, renderer flow-matching loss,
weighted total, learning rate) and a markdown report with the plot, also written to
`<run>/report.md` beside `plots/loss.png`."""
from __future__ import annotations

import base64
import math
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact

from data_specs.train import TrainSpec, load_train_spec
from flows.ops.monitor import on_flow_running, stop_promptly
from flows.run_names import artifact_key, run_name
from music_model.music import training
from music_model.roles import resident_roles
from safe_files import write_atomic
from tasks.engine.faults import stops_on_fault
from tasks.train_tasks import train_task

MAX_TABLE_ROWS = 500


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def report(summary: dict, plot: Path, inline_plot: bool) -> str:
    """The run's markdown report; the plot inline (artifacts: the UI cannot reach the run folder) or
    by its path relative to the report (`<run>/report.md`)."""
    first, last = summary["first"] or {}, summary["last"] or {}
    lines = [
        f"# Training: {summary['name']}", "",
        f"- dataset: {summary['dataset']} ({summary['dataset_rows']} samples)",
        f"- steps: {summary['steps']} of {summary['total_steps']} ({summary['samples']} samples seen; resumed from "
        f"{summary['resumed_from'] or 'nothing'})",
        f"- LoRA rank {summary['lora']['rank']}, alpha {summary['lora']['alpha']}, lr {summary['lr']}; loss weights "
        f"{summary['loss_weights']}; trainable parameters {summary['trainable_parameters']}",
        f"- skipped: {summary['skipped'] or 'none'}",
        f"- adapters: {', '.join(f'{k}: {v}' for k, v in summary['adapters'].items())}", "",
        "| | step | planner CE | renderer | weighted total |", "|---|---|---|---|---|",
        f"| first | {first.get('step', '—')} | {_fmt(first.get('planner'))} | {_fmt(first.get('renderer'))} | {_fmt(first.get('loss'))} |",
        f"| last | {last.get('step', '—')} | {_fmt(last.get('planner'))} | {_fmt(last.get('renderer'))} | {_fmt(last.get('loss'))} |",
        "",
    ]
    if inline_plot and plot.exists():
        lines += [f"![loss curve](data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()})", "", f"Plot: {plot}"]
    elif plot.exists():
        lines.append(f"![loss curve]({plot.relative_to(summary['output']).as_posix()})")
    return "\n".join(lines) + "\n"


@flow(name="train", flow_run_name=run_name("train"), log_prints=True, on_running=[on_flow_running])
@stops_on_fault  # outside the task runs too: writing the report on a full disk is one line
def train(spec_json: str) -> dict:
    """Train the MUSIC model's LoRA adapters from a published training set; resumes from the run's
    newest checkpoint when there is one. Returns the run summary (adapters, steps, losses, plot)."""
    logger = get_run_logger()
    spec = TrainSpec.model_validate_json(spec_json)
    stream = training.PublishedStream(spec.dataset_dir())  # a missing dataset fails here, before any model loads
    steps = training.total_steps(spec, stream.size)
    progress = create_progress_artifact(0.0, key=artifact_key(spec.name, "train-progress"),
                                        description=f"{spec.name}: optimizer steps done of {steps}")
    # What a memory-tight GPU must not hold while training starts (the pipeline frees the build's models).
    resident = [f"{role} {model} on {device}" for role, model, device in resident_roles()]
    with stop_promptly():
        summary = {**train_task(spec_json, spec.name, progress, steps), "models_resident_at_start": resident}
    history = training.read_history(summary["output"])
    stride = max(1, math.ceil(len(history) / MAX_TABLE_ROWS))
    table = [{k: r.get(k) for k in ("step", "epoch", "samples", "planner", "renderer", "loss", "lr")} for r in history[::stride]]
    if table:
        create_table_artifact(table, key=artifact_key(spec.name, "losses"),
                              description=f"{spec.name}: loss per optimizer step" + (f" (every {stride}th)" if stride > 1 else ""))
    plot = Path(summary["plot"])
    write_atomic(Path(summary["output"]) / "report.md", lambda tmp: tmp.write_text(report(summary, plot, inline_plot=False)))
    create_markdown_artifact(report(summary, plot, inline_plot=True), key=artifact_key(spec.name, "train-report"),
                             description=f"training report of {spec.name}")
    logger.info("trained %d steps; adapters in %s", summary["steps"], Path(summary["output"]) / "adapter")
    return summary


@flow(name="train-from-file", flow_run_name=run_name("train"), on_running=[on_flow_running])
def train_from_file(spec_path: str) -> dict:
    """`train` from a spec file: the deployment entry point (a YAML path is a readable parameter)."""
    return train(load_train_spec(spec_path).model_dump_json())

