"""What the DreamBench and the multi-subject evaluations share: shard bookkeeping (chunks, input
fingerprints, marker paths, gathering shard files; the markers themselves are `tasks.engine.markers`'), report pieces (JSON without NaN, Markdown tables,
the paper's published rows, the Pass@N section) and the plotting set-up."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_specs.eval import PAPER_FIGURES, PAPER_FIGURES_SOURCE, EvalSpec, Metric
from safe_files import write_atomic
from tasks.engine.contract import write_table
from tasks.engine.markers import shard_name

# --- shards ---------------------------------------------------------------------------------------


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# Bump when the scoring code changes what a shard holds (2: the detector scores a phrase over all its
# tokens), so a resumed evaluation never reuses scores the old code made.
SCORING_VERSION = 2


def fingerprint(spec: EvalSpec, benchmark: str, inputs: str) -> str:
    """What a shard's scores depend on: the scoring code's version, the scoring models, the grounding
    parameters, the inputs."""
    payload = {"version": SCORING_VERSION, "benchmark": benchmark, "roles": {k: v.model_dump() for k, v in sorted(spec.roles.items())},
               "grounding": spec.grounding.model_dump(), "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def files_digest(paths: list[Path]) -> str:
    """Cheap content identity of files: path, size and modification time."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def gather(work_dir: Path, shards: int, kind: str, schema: pa.Schema) -> list[dict]:
    rows = []
    for shard in range(shards):
        rows.extend(pq.read_table(work_dir / f"{shard_name(shard)}.{kind}.parquet", schema=schema).to_pylist())
    return rows



# --- reports --------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """`value` with NaN floats as None (JSON has no NaN) and numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(json_safe(value), indent=1) + "\n"))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def with_ci(mean: float, low: float, high: float) -> str:
    return "—" if math.isnan(mean) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> list[str]:
    if not rows:
        return ["(none)"]
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def published_note(differs: str) -> list[str]:
    """What the paper's rows in a report are: published figures of another model (on another
    benchmark, for MSIC: `differs` says what differs), shown for context, never as a like-for-like
    comparison."""
    return [f"The paper's rows are its published figures for its own model (built on SEED-X); {differs}. "
            "They are context, not a comparison: docs/FIDELITY.md lists every difference.", ""]


def comparison_rows(benchmark: str, measured: list[dict]) -> list[dict]:
    """The paper's published rows beside ours, each labelled with where its numbers come from."""
    published = [{"row": f"{p['method']} ({p['setting']})", "source": PAPER_FIGURES_SOURCE, "dino": p["dino"],
                  "clip_i": p["clip_i"], "clip_t": p["clip_t"]} for p in PAPER_FIGURES if p["benchmark"] == benchmark]
    return published + measured


def tiny_note(models: dict[str, str]) -> list[str]:
    if any(model.startswith("zoo:") for model in models.values()):
        return ["", "> **Tiny random zoo models**: the protocol is the real one; the numbers are not quality measures.", ""]
    return []


def passn_outputs(curve: list[dict], metrics: tuple[Metric, ...], out: Path, identity: str) -> list[str]:
    if not curve:
        return ["", "## Pass@N", "", "One image per prompt: no Pass@N curve (needs 2 or more candidates per prompt)."]
    write_table(curve, pa.schema([("selector", pa.string()), ("n", pa.int32())] + [m.column for m in metrics]),
                out / "scores" / "passn.parquet")
    plot_passn(curve, metrics, out / "plots" / "passn.png")
    return ["", "## Pass@N", "",
            f"Expected score of the selected candidate when n of the N candidates are drawn (exact, every candidate used). "
            f"`clip_t`: the selector model's text-image cosine; `identity_aware`: that + weight x {identity}.", "",
            *markdown_table(curve, ["selector", "n", *(m.name for m in metrics)]), "", "![Pass@N](plots/passn.png)"]



# --- plots ----------------------------------------------------------------------------------------


def figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plot_passn(curve: list[dict], metrics: tuple[Metric, ...], path: Path) -> None:
    plt = figure()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.1 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for selector in dict.fromkeys(p["selector"] for p in curve):
            points = [p for p in curve if p["selector"] == selector]
            ax.plot([p["n"] for p in points], [p[metric.name] for p in points], marker="o", label=selector)
        ax.set_title(metric.label, fontsize=9)
        ax.set_xticks(sorted({p["n"] for p in curve}))
        ax.set_xlabel("N")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Pass@N: expected score of the selected candidate")
    save_figure(plt, fig, path)
