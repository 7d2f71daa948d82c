"""The MUSIC model's training as a plain function (a training run and its loss plot; no Prefect)
plus its Prefect task wrapper. Its generation on a benchmark is the benchmark's own
(`tasks.evaluate.benchmark.Generation`, in the benchmark's module).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from prefect import task

from data_specs.train import TrainSpec
from music_model.music.training import read_history, train
from safe_files import write_atomic
from tasks.engine.faults import stops_on_fault

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
