"""Evaluation work: the benchmarks, each one module with a `Benchmark` (`benchmark.py`, the
interface) listed in `registry.py`, whose plain functions check inputs, score one shard, aggregate
and report, and generate with the MUSIC model; `shard_tasks.py` runs their shard functions as Prefect
task runs. The plain functions need no Prefect: tests, notebooks and other orchestrators call them.

One evaluation writes to `<output_root>/<name>/`::

    plan.parquet                                   the generated images matched to the benchmark
    shards/<fingerprint>/part-00003.*.parquet      one shard's scores and drops, then its marker
    shards/<fingerprint>/part-00003.done.json      (a rerun with the same inputs skips done shards)
    scores/images.parquet | scores/candidates.parquet   one row per scored image
    scores/subjects.parquet                        per subject (DreamBench) / per subject per image (MSIC)
    scores/by_subject_count.parquet, scores/passn.parquet
    dropped.parquet                                every input left out, with its reason
    summary.json, report.md, plots/*.png

Scores are raw cosines (`music_model.scoring.metrics.SCALE`), stated in summary.json and report.md.

`common.py` holds what the benchmarks share (shard bookkeeping, report pieces, plotting);
`dreambench.py` (DreamBench) and `cases.py` (MSIC, or any multi-subject cases table) each hold one
benchmark; `passn_budget.py` is `music eval passn-budget` on MSIC.
"""
