"""filter: per-shard rules (subject count bounds) and the CLIP embedding of each target, which
publish uses to drop near-duplicate sources across the whole build."""
from __future__ import annotations

from tasks.contract import Stage, StageContext


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    params = ctx.spec.filter
    kept = []
    for row in rows:
        if not params.min_subjects <= row["num_subjects"] <= params.max_subjects:
            ctx.drop(row, "subject_count_out_of_range", str(row["num_subjects"]))
        else:
            kept.append(row)
    # Decimated siblings share their target: embed each source image once.
    sources = {row["source_id"]: row for row in kept}
    if sources:
        embeddings = ctx.timed(ctx.role("clip").embed_images, [ctx.image(r["image"]) for r in sources.values()])
        by_source = dict(zip(sources, embeddings))
        kept = [{**row, "clip_embedding": by_source[row["source_id"]].tolist()} for row in kept]
    return kept


# near_duplicate_clip is publish's: the embedding does not depend on it.
STAGE = Stage("filter", 1, process, roles=("clip",), reads=("filter.min_subjects", "filter.max_subjects"),
              writes=("clip_embedding",), unit="sources")
