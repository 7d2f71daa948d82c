"""decimate: each sample with n subjects also yields the samples with n-1, ..., `min_subjects`
subjects (smallest subject dropped first, IDs renumbered everywhere), linked by `source_id`."""
from __future__ import annotations

import json

from music_model.decimate import decimate
from music_model.layout import layout_to_text
from tasks.engine import Stage, StageContext


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    grid = ctx.spec.layout.grid
    out = []
    for row in rows:
        sample = {**row, "cot": json.loads(row["cot"])}
        for step in decimate(sample, ctx.spec.decimate.min_subjects):
            count = len(step["subjects"])
            out.append({
                **step,
                "id": row["id"] if count == row["num_subjects"] else f"{row['id']}-n{count}",
                "source_id": row["id"],
                "num_subjects": count,
                "cot": json.dumps(step["cot"], sort_keys=True),
                "layout_text": layout_to_text(step["layout"], grid),
            })
    return out


STAGE = Stage("decimate", 1, process)
