"""filter: per-shard rules (subject count bounds) and the CLIP embedding of each target, which
publish uses to drop near-duplicate sources across the whole build."""
from __future__ import annotations

from pydantic import Field

from data_specs.build import Section
from tasks.engine.contract import PublishedScore, Stage, StageContext, Threshold


class FilterParams(Section):
    min_subjects: int = Field(2, ge=1)
    max_subjects: int = Field(12, ge=1)
    near_duplicate_clip: float = Field(0.95, ge=-1, le=1.0001, description="CLIP image cosine at or above: near duplicate")


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


# near_duplicate_clip is publish's to apply (across shards; the embedding does not depend on it), but
# the filter's parameter: its threshold and published score are declared here.
STAGE = Stage(
    "filter", 1, process, FilterParams, roles=("clip",), reads=("filter.min_subjects", "filter.max_subjects"),
    writes=("clip_embedding",), unit="sources", plan="select",
    thresholds=(Threshold("filter.near_duplicate_clip", "near_duplicate_clip", "at_or_above", "per source after the first: "
                          "its highest CLIP cosine to an earlier kept source, as publish compares", measured_at="publish"),),
    published=(PublishedScore("near_duplicate_clip", "sample", None,
                              "the highest cosine of the `clip` role's embeddings of this sample's target and the target of any "
                              "other published source with a lower `source_id` (-1.0 for the first); decimated siblings share it",
                              "-1 to 1", lambda spec: f"< `filter.near_duplicate_clip` {spec.filter.near_duplicate_clip}"),),
)
