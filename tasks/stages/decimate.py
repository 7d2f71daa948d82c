"""decimate: each sample with n subjects also yields the samples with n-1, ..., `min_subjects`
subjects (the smallest box dropped first, IDs renumbered everywhere, the layout recomputed for the
subjects left), linked by `source_id`."""
from __future__ import annotations

import json

from pydantic import Field

from data_specs.build import Section
from music_model.subjects.decimate import decimate
from music_model.subjects.layout import layout_grid, layout_to_text, subject_regions
from tasks.engine.contract import Stage, StageContext


class DecimateParams(Section):
    min_subjects: int = Field(2, ge=1)


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    params = ctx.spec.layout
    out = []
    for row in rows:
        sample = {**row, "cot": json.loads(row["cot"])}

        def relayout(subjects: list[dict], height=row["height"], width=row["width"]) -> list[int]:
            regions = subject_regions(subjects, height, width)
            return layout_grid(regions, [s["id"] for s in subjects], lam=params.lam, grid=params.grid).tolist()

        for step in decimate(sample, relayout, ctx.spec.decimate.min_subjects):
            count = len(step["subjects"])
            out.append({
                **step,
                "id": row["id"] if count == row["num_subjects"] else f"{row['id']}-n{count}",
                "source_id": row["id"],
                "num_subjects": count,
                "cot": json.dumps(step["cot"], sort_keys=True),
                "layout_text": layout_to_text(step["layout"], params.grid),
            })
    return out


# Version 2: the smallest box (not mask) dropped first; the layout recomputed, not blanked.
# 3: a dropped subject named once ("shrimp", not "shrimp (shrimp)")
STAGE = Stage("decimate", 3, process, DecimateParams, reads=("decimate", "layout"), plan="decimate",
              writes=("id", "source_id", "num_subjects", "subjects", "instruction", "cot", "layout", "layout_text"))
