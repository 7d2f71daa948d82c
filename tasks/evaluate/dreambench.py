"""DreamBench: generate the missing grid cells with the eval spec's generator, score every generated
image against its subject's photos, then write the outputs (per-image and per-subject scores, Pass@N,
the report with its per-subject plot); and the MUSIC model's generation on it. `BENCHMARK` holds it
all for the registry."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_specs.eval import DREAMBENCH_DROPS, DREAMBENCH_METRICS, DREAMBENCH_SCORES, EvalSpec, load_eval_spec
from data_specs.train import TrainSpec, resolve_spec_path
from music_model.music.model import GENERATION, generate_dreambench_images, load_model
from music_model.roles import load_role
from music_model.scoring.dreambench import DreamBenchError, GeneratedImage, Scan, coverage, generate_missing, load_dreambench, scan_generated, score_generated, summarise
from music_model.scoring.metrics import PROTOCOL, SCALE, Scorer
from music_model.scoring.passn import passn_curve
from safe_files import write_atomic
from tasks.engine.contract import write_table
from tasks.engine.markers import ShardMeter, run_marked, shard_marker, shard_name
from tasks.evaluate.benchmark import Benchmark, Generation, Prepared, ShardRunner
from tasks.evaluate.common import chunks, comparison_rows, figure, files_digest, gather, markdown_table, passn_outputs, published_note, save_figure, tiny_note, with_ci, write_json

PLAN = pa.schema([("subject", pa.string()), ("prompt_index", pa.int32()), ("sample", pa.int32()), ("path", pa.string())])


def write_plan(scan: Scan, path: Path) -> None:
    rows = [{"subject": i.subject, "prompt_index": i.prompt_index, "sample": i.sample, "path": str(i.path)} for i in scan.images]
    write_table(rows, PLAN, path)


def generate_missing_cells(spec_json: str, shard: int, bench_root: str, images_dir: str, subjects: list[str]) -> dict:
    """Render the grid cells of `subjects` that have no image yet with the spec's generator."""
    spec = EvalSpec.model_validate_json(spec_json)
    params = spec.generation
    bench = load_dreambench(bench_root, check_images=False)
    meter = ShardMeter()
    prompts = params.prompt_indices or list(range(min(len(bench.templates(s)) for s in subjects)))
    counts = generate_missing(load_role(spec.generator), bench, images_dir, subjects, prompts, params.images_per_prompt,
                              params.width, params.height, params.seed, params.unique_token, params.reference_index)
    return {"shard": shard, "subjects": subjects, **counts, **meter.figures()}


def score_dreambench_shard(spec_json: str, shard: int, work_dir: str, bench_root: str, plan_path: str, subjects: list[str],
                           with_selection: bool) -> dict:
    """Score every planned image of `subjects` (references and images embedded once, in batches)."""
    work = Path(work_dir)

    def scored() -> tuple[dict, list[Path]]:
        spec = EvalSpec.model_validate_json(spec_json)
        bench = load_dreambench(bench_root, check_images=False)
        wanted = set(subjects)
        images = [GeneratedImage(r["subject"], r["prompt_index"], r["sample"], Path(r["path"]))
                  for r in pq.read_table(plan_path).to_pylist() if r["subject"] in wanted]
        scorer = Scorer.from_specs(spec.roles["dino"], spec.roles["clip"], spec.roles["clip_select"] if with_selection else None)
        rows, drops = score_generated(scorer, bench, images, with_selection)
        outputs = {work / f"{shard_name(shard)}.scores.parquet": (rows, DREAMBENCH_SCORES),
                   work / f"{shard_name(shard)}.dropped.parquet": (drops, DREAMBENCH_DROPS)}
        for path, (table, schema) in outputs.items():
            write_table(table, schema, path)
        return {"shard": shard, "rows_in": len(images), "scored": len(rows), "dropped": dict(Counter(d["reason"] for d in drops))}, list(outputs)

    return run_marked(shard_marker(work, shard), scored)


def prepare_dreambench(spec: EvalSpec, inputs: dict, fill: ShardRunner, logger) -> Prepared:
    """The benchmark folder checked, the missing grid cells rendered when the spec has a generator,
    the generated images scanned and planned, one scoring shard per `shard_size` subjects."""
    root = inputs.get("bench_root") or spec.dreambench_root
    if not root:
        raise DreamBenchError("no DreamBench folder: pass bench_root (--bench) or set dreambench_root in the spec")
    bench = load_dreambench(root)
    out = spec.out_dir()
    images_dir = Path(inputs["images"]).expanduser().resolve() if inputs.get("images") else out / "generated"
    if spec.generator is not None:
        subjects = spec.generation.subjects or list(bench.subjects)
        unknown = [s for s in subjects if s not in bench.subjects]
        if unknown:
            raise DreamBenchError(f"generation.subjects: {unknown[0]!r} has no photos in {bench.root}")
        made = fill([{"bench_root": str(bench.root), "images_dir": str(images_dir), "subjects": group}
                     for group in chunks(subjects, spec.shard_size)])
        logger.info("generated %d images (%d already there) with %s", sum(m["generated"] for m in made),
                    sum(m["existing"] for m in made), spec.generator.model)
    scan = scan_generated(bench, images_dir)
    if scan.drops:
        logger.warning("left out %d files: %s", len(scan.drops), scan.drop_counts())
    plan = out / "plan.parquet"
    write_plan(scan, plan)
    cells = {(i.subject, i.prompt_index) for i in scan.images}
    with_selection = len(cells) < len(scan.images)  # some prompt has several candidates: Pass@N
    references = [p for s in bench.subjects.values() for p in s.references]
    groups = chunks(list(dict.fromkeys(i.subject for i in scan.images)), spec.shard_size)
    return Prepared(files_digest(references + [i.path for i in scan.images]) + f":{with_selection}",
                    [{"bench_root": str(bench.root), "plan_path": str(plan), "subjects": group, "with_selection": with_selection}
                     for group in groups],
                    (bench, scan, images_dir))


def finish_dreambench(spec: EvalSpec, prepared: Prepared, work_dir: Path, extra: dict) -> dict:
    """Write every DreamBench output from the shards' scores; returns the summary and the tables."""
    bench, scan, images_dir = prepared.state
    shards = len(prepared.shards)
    out = spec.out_dir()
    rows = gather(work_dir, shards, "scores", DREAMBENCH_SCORES)
    drops = scan.drops + gather(work_dir, shards, "dropped", DREAMBENCH_DROPS)
    b = spec.bootstrap
    subject_rows, overall = summarise(rows, bench, b.samples, b.confidence, b.seed)
    unreadable = {d["path"] for d in drops}
    cover = coverage(bench, [i for i in scan.images if str(i.path) not in unreadable])
    for row, cells in zip(subject_rows, cover):
        row |= {"prompts_covered": cells["prompts_covered"], "missing_cells": cells["missing_cells"]}
    with_selection = any(not math.isnan(r["select_clip_t"]) for r in rows)
    names = [m.name for m in DREAMBENCH_METRICS]
    curve = passn_curve(rows, ("subject", "prompt_index"), names, "dino", spec.passn.identity_weight, "subject") if with_selection else []
    write_table(rows, DREAMBENCH_SCORES, out / "scores" / "images.parquet")
    write_table(subject_rows, pa.schema([("subject", pa.string()), ("class_noun", pa.string()), ("live", pa.bool_()),
                                         ("images", pa.int32()), ("pairs", pa.int32()), *(m.column for m in DREAMBENCH_METRICS),
                                         ("prompts_covered", pa.int32()), ("missing_cells", pa.int32())]),
                out / "scores" / "subjects.parquet")
    write_table(drops, DREAMBENCH_DROPS, out / "dropped.parquet")
    models = {name: role.model for name, role in spec.roles.items() if name in ("dino", "clip") or (name == "clip_select" and with_selection)}
    score_table = [{"part": part, "subjects": o["subjects"], "images": o["images"],
                    **{m.label: with_ci(o[m.name]["mean"], o[m.name]["ci_low"], o[m.name]["ci_high"]) for m in DREAMBENCH_METRICS}}
                   for part, o in overall.items()]
    measured = [{"row": f"this run ({spec.name}, mean over every image)", "source": "measured here",
                 **{m: overall["all"][m]["mean"] for m in names}}]
    if curve:
        best = [p for p in curve if p["selector"] == "clip_t"][-1]
        measured.append({"row": f"this run (Pass@{best['n']}, clip_t selector)", "source": "measured here", **{m: best[m] for m in names}})
    comparison = comparison_rows(BENCHMARK.name, measured)
    plot_subjects(subject_rows, out / "plots" / "subjects.png")
    summary = {
        "benchmark": BENCHMARK.name, "name": spec.name, "scale": SCALE, "protocol": PROTOCOL, "models": models,
        "dreambench_root": str(bench.root), "subjects_in_table": len(bench.classes), "subjects_present": len(bench.subjects),
        "subjects_absent": bench.absent_subjects(),
        "images_found": len(scan.images) + len(scan.drops), "images_scored": len(rows), "dropped": dict(Counter(d["reason"] for d in drops)),
        "scores": overall, "passn": curve, "comparison": comparison, "output": str(out), "images_dir": str(images_dir), **extra,
    }
    lines = [f"# DreamBench evaluation: {spec.name}", "", f"Scores are **{SCALE}**.", "",
             f"- DINO: {PROTOCOL['dino']} (`{models['dino']}`)", f"- CLIP-I: {PROTOCOL['clip_i']} (`{models['clip']}`)",
             f"- CLIP-T: {PROTOCOL['clip_t']} (`{models['clip']}`)",
             "- A generated image's DINO / CLIP-I is its mean over every real photo of its subject; a subject's score the "
             "mean over its images; the benchmark's the mean over subjects. Intervals: 95% bootstrap over each subject's images.",
             f"- Images: {len(rows)} scored of {summary['images_found']} files; subjects scored "
             f"{overall['all']['subjects']} of {len(bench.subjects)} present ({len(bench.classes)} in the table).",
             *tiny_note(models), "", "## Scores", "", *markdown_table(score_table), "",
             "## The paper's published figures", "",
             *published_note("the benchmark is the same public DreamBench (a subset of its subjects gives other numbers), but the model is not"),
             *markdown_table(comparison, ["row", "source", "dino", "clip_i", "clip_t"]), "",
             "## Per subject", "", *markdown_table(subject_rows), "", "![per subject](plots/subjects.png)"]
    lines += passn_outputs(curve, DREAMBENCH_METRICS, out, "DINO")
    lines += ["", "## Dropped inputs", "", *markdown_table(drops, ["path", "reason", "detail"])]
    report = "\n".join(lines) + "\n"
    write_atomic(out / "report.md", lambda tmp: tmp.write_text(report))
    write_json(out / "summary.json", summary)
    return {"summary": summary, "report": report, "tables": {"scores": score_table, "subjects": subject_rows,
            "comparison": comparison, "passn": curve, "dropped": drops}}


def plot_subjects(subject_rows: list[dict], path: Path) -> None:
    plt = figure()
    rows = [r for r in subject_rows if r["images"]]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 3.4))
    width = 0.27
    for k, metric in enumerate(DREAMBENCH_METRICS):
        ax.bar([i + (k - 1) * width for i in range(len(rows))], [r[metric.name] for r in rows], width, label=metric.label)
    ax.set_xticks(range(len(rows)), [r["subject"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("raw cosine")
    ax.set_title("DreamBench scores per subject")
    ax.legend(fontsize=8)
    save_figure(plt, fig, path)



# --- the MUSIC model's generation ----------------------------------------------------------------
# Into `<run>/generated/dreambench-<fingerprint>/`: images/<subject>/<PP>_<K>.png (the naming
# convention `evaluate` reads), and per shard parts/part-00003.generation.parquet then its marker.


def plan_generation(spec: TrainSpec, logger) -> Prepared:
    """The eval spec's DreamBench, the training spec's subjects and prompts, `shard_size` subjects a shard."""
    if spec.generation.strategy != "full":
        # A DreamBench image that is never rendered would look missing to every rerun (its file name is its cell).
        logger.warning("generation.strategy %s applies to MSIC only: DreamBench renders every candidate in full", spec.generation.strategy)
    root = load_eval_spec(resolve_spec_path(spec.evaluation.eval_spec)).dreambench_root
    if not root:
        raise ValueError(f"{spec.evaluation.eval_spec}: dreambench_root is not set")
    bench = load_dreambench(root)
    subjects = spec.evaluation.dreambench_subjects or list(bench.subjects)
    unknown = [s for s in subjects if s not in bench.subjects]
    if unknown:
        raise ValueError(f"evaluation.dreambench_subjects: {unknown[0]!r} has no photos in {bench.root}")
    prompts = spec.evaluation.dreambench_prompts or list(range(min(len(bench.templates(s)) for s in subjects)))
    inputs = files_digest([p for s in subjects for p in bench.subjects[s].references]) + json.dumps([subjects, prompts])
    return Prepared(inputs, [{"bench_root": str(bench.root), "subjects": group, "prompt_indices": prompts}
                             for group in chunks(subjects, spec.generation.shard_size)], str(bench.root))


def generate_dreambench_part(spec_json: str, adapters: str | None, shard: int, out_dir: str, bench_root: str, subjects: list[str],
                             prompt_indices: list[int]) -> dict:
    """The DreamBench grid cells of `subjects` that have no image yet (in `out_dir/images/`), plus their generation records."""
    out = Path(out_dir)

    def generated() -> tuple[dict, list[Path]]:
        spec = TrainSpec.model_validate_json(spec_json)
        bench = load_dreambench(bench_root, check_images=False)
        counts, records = generate_dreambench_images(load_model(spec, adapters), bench, out / "images", subjects, prompt_indices,
                                                     spec.generation.candidates, spec.generation.seed)
        outputs = [out / "parts" / f"{shard_name(shard)}.generation.parquet"]
        write_table(records, GENERATION, outputs[0])
        return {"shard": shard, "subjects": subjects, **counts}, outputs

    return run_marked(shard_marker(out / "parts", shard), generated)


def finish_generation(out: Path, plan: Prepared) -> tuple[dict, dict]:
    images = str(out / "images")
    return {"images_dir": images, "bench_root": plan.state}, {"images": images, "bench_root": plan.state}


BENCHMARK = Benchmark(
    name="dreambench", metrics=DREAMBENCH_METRICS, prepare=prepare_dreambench, score_shard=score_dreambench_shard,
    finish=finish_dreambench, fill_shard=generate_missing_cells,
    generation=Generation(wanted=lambda spec: spec.evaluation.dreambench, plan=plan_generation,
                          generate_shard=generate_dreambench_part, finish=finish_generation),
)
