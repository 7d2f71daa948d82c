"""Evaluation work: plain functions over one shard (generate DreamBench images, score DreamBench
images, score multi-subject cases), the aggregation that writes every output, and thin Prefect task
wrappers. The plain functions need no Prefect: tests, notebooks and other orchestrators call them.

One evaluation writes to `<output_root>/<name>/`::

    plan.parquet                                   the generated images matched to the benchmark
    shards/<fingerprint>/part-00003.*.parquet      one shard's scores and drops, then its marker
    shards/<fingerprint>/part-00003.done.json      (a rerun with the same inputs skips done shards)
    scores/images.parquet | scores/candidates.parquet   one row per scored image
    scores/subjects.parquet                        per subject (DreamBench) / per subject per image (cases)
    scores/by_subject_count.parquet, scores/passn.parquet
    dropped.parquet                                every input left out, with its reason
    summary.json, report.md, plots/*.png

Scores are raw cosines (`music_model.scoring.metrics.SCALE`), stated in summary.json and report.md.

`common.py` holds what both benchmarks share (shard bookkeeping, report pieces, plotting);
`dreambench.py` and `cases.py` each hold one benchmark's shard functions, its aggregation and its
Prefect task wrappers.
"""
