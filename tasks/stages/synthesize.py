"""synthesize: the text-to-image target of each caption, seeded per sample."""
from __future__ import annotations

from pydantic import Field

from data_specs.build import Section
from tasks.engine.contract import Stage, StageContext


class SynthesizeParams(Section):
    width: int = Field(1024, ge=16)
    height: int = Field(1024, ge=16)


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    params = ctx.spec.synthesize
    t2i = ctx.role("t2i")
    images = ctx.timed(
        t2i.generate, [r["caption"] for r in rows], [ctx.seed(r["index"]) for r in rows], width=params.width, height=params.height
    )
    return [
        {**row, "image": ctx.store_image(image), "width": image.width, "height": image.height}
        for row, image in zip(rows, images)
    ]


STAGE = Stage("synthesize", 1, process, SynthesizeParams, roles=("t2i",), reads=("synthesize",), writes=("image", "width", "height"))
