"""A stage that lives outside the project: a per-sample sharpness score with its own spec section,
a threshold `music calibrate` reports and a published column. `test_build` adds it to a copy of
`tasks.stages.STAGES` with one line, as a user adds a stage."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from data_specs.build import Section
from tasks.engine.contract import PublishedScore, Stage, StageContext, Threshold


class SharpnessParams(Section):
    min_sharpness: float = Field(0.0, ge=0, description="a sample whose target is softer than this is dropped")


def sharpness(image) -> float:
    """Mean absolute 4-neighbour Laplacian of the grey image, in [0, 1] units."""
    grey = np.asarray(image.convert("L"), np.float32) / 255
    laplacian = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float(np.float32(np.abs(laplacian).mean()))


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    kept = []
    for row in rows:
        value = sharpness(ctx.image(row["image"]))
        passed = value >= ctx.spec.sharpness.min_sharpness
        ctx.score(row, "sharpness", value, passed)
        if passed:
            kept.append({**row, "sharpness": value})
        else:
            ctx.drop(row, "too_soft", f"sharpness {value:.4f} < {ctx.spec.sharpness.min_sharpness}")
    return kept


STAGE = Stage(
    "sharpness", 1, process, SharpnessParams, reads=("sharpness",), writes=("sharpness",),
    columns=(("sharpness", pa.float32()),), scores=("sharpness",),
    thresholds=(Threshold("sharpness.min_sharpness", "sharpness", "below"),),
    published=(PublishedScore("sharpness", "sample", "sharpness", "mean absolute Laplacian of the target (sharpness)",
                              "0 to 1", lambda spec: f">= `sharpness.min_sharpness` {spec.sharpness.min_sharpness}"),),
)
