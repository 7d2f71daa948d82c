"""segment + layout: the segmenter turns each box into a mask; the mask is kept over the box only
when CLIP matches the masked region to the category text better than the box crop (paper); the
chosen regions are projected onto the 8x8 grid (tau = lambda * mean IoU) with its text form.

CLIP sees both views in one frame (`subject_view`): the subject's box padded to a square, the
mask view grey outside the mask, so its centre crop holds the whole subject (not the middle third
of a tall one) and the two scores differ only by the region. Each subject keeps the difference
as `mask_clip_margin` (mask score minus box score)."""
from __future__ import annotations

import numpy as np
from pydantic import Field

from data_specs.build import Section
from music_model.media import masks as rle
from music_model.media.images import subject_view
from music_model.subjects import nouns
from music_model.subjects.layout import box_to_mask, layout_grid, layout_to_text
from tasks.engine.contract import PublishedScore, Stage, StageContext


class LayoutParams(Section):
    grid: int = Field(8, ge=2, le=32)
    lam: float = Field(0.05, gt=0, le=1, description="tau = lam * mean IoU")


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    params = ctx.spec.layout
    segmenter, clip = ctx.role("segmenter"), ctx.role("clip")
    images = [ctx.image(r["image"]) for r in rows]
    boxes = [np.array([s["box"] for s in r["subjects"]], np.float32).reshape(-1, 4) for r in rows]
    all_masks = ctx.timed(segmenter.segment, images, boxes)
    mask_views, box_views, texts = [], [], []
    for row, image, masks in zip(rows, images, all_masks):
        for subject, mask in zip(row["subjects"], masks):
            mask_views.append(subject_view(image, subject["box"], mask))
            box_views.append(subject_view(image, subject["box"]))
            texts.append(f"a photo of {nouns.with_article(subject['category'])}")
    if texts:
        text_emb = ctx.timed(clip.embed_texts, texts)
        mask_score = (ctx.timed(clip.embed_images, mask_views) * text_emb).sum(1)
        box_score = (ctx.timed(clip.embed_images, box_views) * text_emb).sum(1)
    kept, position = [], 0
    for row, image, masks in zip(rows, images, all_masks):
        width, height = image.size
        subjects, regions = [], []
        for subject, mask in zip(row["subjects"], masks):
            margin = float(mask_score[position] - box_score[position])
            use_mask = bool(mask.any()) and margin > 0
            position += 1
            region = mask if use_mask else box_to_mask(np.array(subject["box"]), height, width)
            regions.append(region)
            subjects.append({**subject, "mask": rle.encode(mask), "region": "mask" if use_mask else "box",
                             "area": float(region.mean()), "mask_clip_margin": margin})
        grid = layout_grid(np.stack(regions), [s["id"] for s in subjects], lam=params.lam, grid=params.grid)
        kept.append({**row, "subjects": subjects, "layout": grid.tolist(), "layout_text": layout_to_text(grid, params.grid)})
    return kept


# 2: mask and box views framed alike (the box, padded to a square); the CLIP margin kept per subject
STAGE = Stage(
    "layout", 3, process, LayoutParams, roles=("segmenter", "clip"), reads=("layout",), writes=("subjects", "layout", "layout_text"),
    unit="subjects",
    published=(PublishedScore("mask_clip_margins", "subject", "mask_clip_margin",
                              "the `clip` role's score of the masked region minus the box crop's, against `a photo of a "
                              "{category}` (layout): above 0, the mask matched better and is the region unless empty", "-2 to 2"),),
)
