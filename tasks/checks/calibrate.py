"""`music calibrate`: a small build of a spec (its first N sources, no target, in a folder of its
own) and, read back from that build's stage folders, what a full build's thresholds would do:
per-stage keep rates and, for every threshold, the distribution of the score it cuts (quantiles,
count and the share the spec's value drops) as markdown, JSON and a PNG of histograms with the
threshold drawn, written into the calibration build's folder. Run it on real checkpoints before
a full build; the tiny zoo's scores are noise.

The small build is the spec's own build flow on a copy of the spec (`calibration_spec`): same name
and seed, so its samples are the full build's first N sources, byte for byte. With `--vary
section.field=a,b` each value is a variant (`variant_spec`) built one after the other into that
same folder: a stage whose fingerprint does not read the field has the same fingerprint in every
variant, so its shards are made once and reused (`shared_stages`), and each variant's report goes
to `calibrate/<field>=<value>/`. No Prefect here: a notebook can call `calibration_report` on any
finished build folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from data_specs.build import BuildSpec
from safe_files import write_atomic
from tasks.checks.clean import current_fingerprints
from tasks.engine.build_paths import build_dir, stage_dir
from tasks.engine.contract import Stage, Threshold, num_shards, read_rows
from tasks.engine.markers import scores_path, shard_name
from tasks.publishing.publish import near_duplicate_scores, read_filter_index
from tasks.stages import STAGES, parse_build_spec, thresholds

QUANTILES = {"min": 0, "p5": 5, "p25": 25, "median": 50, "p75": 75, "p95": 95, "max": 100}
DROPS = {"below": np.less, "above": np.greater, "at_or_above": np.greater_equal}


def calibration_spec(spec: BuildSpec, sources: int) -> BuildSpec:
    """`spec` for a calibration build of its first `sources` sources: no target, written under
    `<output_root>/<name>-calibrate-<sources>/`, so it never touches the full build's folder. The
    name and seed stay: the samples are the full build's own first sources."""
    root = Path(spec.output_root) / f"{spec.name}-calibrate-{sources}"
    return spec.model_copy(update={"num_source_images": sources, "target": None, "output_root": str(root)})


def parse_vary(text: str) -> tuple[str, list]:
    """`section.field=a,b` as the field and its values, each read as YAML (`64` an int, `0.5` a float)."""
    field, sep, values = text.partition("=")
    parts = [v.strip() for v in values.split(",")]
    if not sep or field.count(".") != 1 or len(parts) < 2 or not all(parts):
        raise ValueError(f"--vary {text!r}: expected section.field=a,b (two or more values)")
    return field.strip(), [yaml.safe_load(v) for v in parts]


def variant_spec(spec: BuildSpec, field: str, value) -> BuildSpec:
    """`spec` with `field` (section.field) set to `value`, validated as a spec file is."""
    section, name = field.split(".")
    data = spec.model_dump(mode="json")
    if not isinstance(data.get(section), dict) or name not in data[section]:
        raise ValueError(f"--vary: the spec has no field {field}")
    data[section][name] = value
    return parse_build_spec(data)


def variant_label(field: str, value) -> str:
    return f"{field}={value}"


def shared_stages(specs: list[BuildSpec]) -> list[str]:
    """The stages every spec builds under one fingerprint: made once, whichever variant comes first."""
    fingerprints = [current_fingerprints(spec) for spec in specs]
    return [stage.name for stage in STAGES if len({fp[stage.name] for fp in fingerprints}) == 1]


def variants_table(field: str, variants: list[dict], shared: list[str]) -> str:
    """Variants side by side: samples, the share of sources published, the task runs each needed and
    model-seconds per published sample (all stages, and each model stage a variant makes its own)."""
    model_stages = {stage.name for stage in STAGES if stage.roles}
    stages = [s for s in variants[0]["cost"] if s in model_stages and s not in shared]
    lines = [f"Variants of {field} (model-seconds per published sample: all stages, then each stage the variants make apart):",
             f"  {'value':>8s} {'samples':>7s} {'published/source':>16s} {'task runs':>9s} {'all':>9s} "
             + " ".join(f"{s:>10s}" for s in stages)]
    for v in variants:
        def cell(value) -> str:
            return "-" if value is None else f"{value:.4f}"

        lines.append(f"  {str(v['value']):>8s} {v['samples']:7d} {v['samples'] / v['sources']:16.3f} {v['task_runs']:9d} "
                     f"{cell(v['cost'].get('all')):>9s} " + " ".join(f"{cell(v['cost'].get(s)):>10s}" for s in stages))
    return "\n".join(lines)


def spec_value(spec: BuildSpec, path: str) -> float | None:
    value = spec
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


def score_values(spec: BuildSpec, stage: Stage, threshold: Threshold, folders: dict[str, Path], shards: int) -> tuple[list[float], str]:
    """The values `threshold` (of `stage`) cuts, from the build's shards, and which values they are."""
    if threshold.measured_at == "publish":
        index = read_filter_index(folders["filter"], shards)
        nearest = near_duplicate_scores(index.embeddings, spec.filter.near_duplicate_clip)
        return [score for _, score in nearest.values()], "every source after the first"
    folder = folders[stage.name]
    if threshold.score in stage.scores:  # the stage's scores table: kept and rejected alike
        rows = [r for k in range(shards) for r in read_rows(scores_path(folder, k)) if r["name"] == threshold.score]
        return [r["value"] for r in rows], "every candidate"
    values = [s.get(threshold.score) for k in range(shards) for row in read_rows(folder / f"{shard_name(k)}.parquet")
              for s in row["subjects"]]
    return [float(v) for v in values if v is not None], "the subjects the stage kept"


def summarize(values: list[float], value: float, drops: str) -> dict:
    """Quantiles, count and the share of `values` that `value` drops."""
    if not values:
        return {"count": 0, **{name: None for name in QUANTILES}, "dropped": None}
    array = np.asarray(values, np.float64)
    quantiles = np.percentile(array, list(QUANTILES.values()))
    return {"count": len(array), **{name: round(float(q), 4) for name, q in zip(QUANTILES, quantiles)},
            "dropped": round(float(DROPS[drops](array, value).mean()), 4)}


def keep_rates(funnel: list[dict]) -> list[dict]:
    """The build's funnel (stats.json's) as keep rates: in, kept, the share kept, dropped by reason."""
    return [{"stage": s["stage"], "in": s["rows_in"], "kept": s["rows_out"],
             "kept_share": round(s["rows_out"] / s["rows_in"], 4) if s["rows_in"] else None, "dropped": s["dropped"]}
            for s in funnel]


def plot(rows: list[dict], values: dict[str, list[float]], path: Path) -> None:
    """A histogram panel per threshold, its value a red line and the side it drops shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2 if len(rows) > 1 else 1
    lines = -(-len(rows) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(6 * columns, 3.6 * lines), squeeze=False)
    for axis, row in zip(axes.flat, rows):
        data, value = values[row["threshold"]], row["value"]
        label, where = f"{row['threshold']} = {value}", ""
        if data:
            # The axis spans the data, and the threshold unless it lies more than the data's span away
            # (a bound set to let everything through): then it is marked at the edge, off the scale.
            low, high = min(data), max(data)
            span = high - low or max(abs(high), 1.0) * 0.01
            shown = low - span <= value <= high + span
            low, high = (min(low, value), max(high, value)) if shown else (low, high)
            pad = (high - low) * 0.05 or 0.05
            axis.hist(data, bins=min(40, max(8, 2 * int(np.sqrt(len(data))))), color="#4c72b0", range=(low - pad, high + pad))
            axis.set_xlim(low - pad, high + pad)
            if shown:
                side = (low - pad, value) if row["drops"] == "below" else (value, high + pad)
                axis.axvspan(*side, color="#c44e52", alpha=0.12)
                axis.axvline(value, color="#c44e52", linestyle="--", linewidth=2, label=label)
            else:
                left = value < low
                where = f" (off the scale, {'left' if left else 'right'})"
                axis.axvline(low - pad if left else high + pad, color="#c44e52", linestyle=":", linewidth=3, label=label + where)
        else:
            axis.text(0.5, 0.5, "no values", ha="center", va="center", transform=axis.transAxes)
            axis.axvline(value, color="#c44e52", linestyle="--", linewidth=2, label=label)
        dropped = "-" if row["dropped"] is None else f"{100 * row['dropped']:.1f}%"
        axis.set_title(f"{row['threshold']} = {value}{where}: drops {dropped} ({row['drops']})", fontsize=10)
        axis.set_xlabel(f"{row['stage']} {row['score']} ({row['values']}, n = {row['count']})", fontsize=9)
        axis.set_ylabel("count")
        axis.legend(fontsize=8, loc="best")
    for axis in list(axes.flat)[len(rows):]:
        axis.set_visible(False)
    figure.suptitle("Threshold calibration: score distributions and the spec's thresholds", fontsize=11)
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, metadata={"Software": None}))
    plt.close(figure)


def markdown(report: dict) -> str:
    def cell(value) -> str:
        return "-" if value is None else str(value)

    variant = f" ({report['variant']})" if report.get("variant") else ""
    lines = [f"# Calibration of {report['spec']}{variant}: {report['sources']} sources", "", f"Build folder: `{report['build']}`", "",
             "## Keep rates", "", "| stage | in | kept | kept share | dropped by reason |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['in']} | {r['kept']} | {cell(r['kept_share'])} | "
              f"{', '.join(f'{k}: {v}' for k, v in r['dropped'].items()) or '-'} |" for r in report["keep_rates"]]
    lines += ["", "## Thresholds", "", "The distribution of each score a threshold cuts, and the share of it the spec's value drops.",
              "", "| threshold | value | drops | score | values | " + " | ".join(QUANTILES) + " | count | dropped |",
              "|---|---|---|---|---|" + "---|" * (len(QUANTILES) + 2)]
    lines += [f"| `{r['threshold']}` | {r['value']} | {r['drops']} | {r['stage']} `{r['score']}` | {r['values']} | "
              + " | ".join(cell(r[name]) for name in QUANTILES) + f" | {r['count']} | {cell(r['dropped'])} |" for r in report["thresholds"]]
    lines += [""] + [f"- `{r['threshold']}`: {r['note']}" for r in report["thresholds"] if r["note"]]
    lines += ["", f"![thresholds]({Path(report['plot']).name})", "",
              f"Preview sheets ({len(report['preview'])}): `{report['preview_dir']}`", ""]
    return "\n".join(lines)


def text_table(report: dict) -> str:
    """The keep rates and threshold rows as aligned text, for the terminal."""
    def cell(value) -> str:
        return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    lines = ["Keep rates:"]
    for r in report["keep_rates"]:
        share = "-" if r["kept_share"] is None else f"{100 * r['kept_share']:.1f}%"
        reasons = ", ".join(f"{k}: {v}" for k, v in r["dropped"].items()) or "-"
        lines.append(f"  {r['stage']:10s} in {r['in']:5d}  kept {r['kept']:5d} ({share:>6s})  dropped {reasons}")
    widths = max(len(r["threshold"]) for r in report["thresholds"]) if report["thresholds"] else 10
    lines += ["", "Thresholds (the score each cuts; dropped: the share of it the spec's value drops):",
              f"  {'threshold':{widths}s} {'value':>7s} {'drops':11s} " + " ".join(f"{q:>7s}" for q in QUANTILES)
              + f" {'count':>6s} {'dropped':>7s}  values"]
    for r in report["thresholds"]:
        lines.append(f"  {r['threshold']:{widths}s} {cell(r['value']):>7s} {r['drops']:11s} "
                     + " ".join(f"{cell(r[q]):>7s}" for q in QUANTILES)
                     + f" {r['count']:6d} {cell(r['dropped']):>7s}  {r['stage']} {r['score']}: {r['values']}")
    lines += [f"  note, {r['threshold']}: {r['note']}" for r in report["thresholds"] if r["note"]]
    return "\n".join(lines)


def calibration_report(spec: BuildSpec, sources: int | None = None, variant: str | None = None) -> dict:
    """Keep rates and threshold distributions of the finished build of `spec` (a calibration spec,
    or any spec), written to `<build>/calibrate/calibration.{md,json}` and `thresholds.png`
    (a `variant`'s to `<build>/calibrate/<variant>/`)."""
    root, shards = build_dir(spec).resolve(), num_shards(spec)
    fingerprints = current_fingerprints(spec)
    folders = {stage: stage_dir(spec, stage, fp) for stage, fp in fingerprints.items()}
    stats = json.loads((root / "dataset" / "stats.json").read_text())
    rows, values = [], {}
    for stage, threshold in thresholds():
        value = spec_value(spec, threshold.field)
        if value is None:
            continue
        values[threshold.field], which = score_values(spec, stage, threshold, folders, shards)
        rows.append({"threshold": threshold.field, "value": value, "drops": threshold.drops,
                     "stage": threshold.measured_at or stage.name,
                     "score": threshold.score, "values": which, **summarize(values[threshold.field], value, threshold.drops),
                     "note": threshold.note})
    out = root / "calibrate" / variant if variant else root / "calibrate"
    report = {"spec": spec.name, "variant": variant, "sources": sources or spec.num_source_images, "build": str(root),
              "keep_rates": keep_rates(stats["funnel"]), "thresholds": rows,
              "table": str(out / "calibration.md"), "json": str(out / "calibration.json"), "plot": str(out / "thresholds.png"),
              "preview_dir": str(root / "dataset" / "preview"), "preview": [str(root / "dataset" / p) for p in stats.get("preview", [])]}
    plot(rows, values, out / "thresholds.png")
    write_atomic(out / "calibration.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1) + "\n"))
    write_atomic(out / "calibration.md", lambda tmp: tmp.write_text(markdown(report)))
    return report
