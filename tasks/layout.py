"""segment + layout: the segmenter turns each box into a mask; the mask is kept over the box only
when CLIP matches the masked region to the category text better than the box crop (paper); the
chosen regions are projected onto the 8x8 grid (tau = lambda * mean IoU) with its text form."""
from __future__ import annotations

import numpy as np

from music_model.media import masks as rle
from music_model.media.images import crop, masked
from music_model.subjects.layout import box_to_mask, layout_grid, layout_to_text
from tasks.engine import Stage, StageContext


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    params = ctx.spec.layout
    segmenter, clip = ctx.role("segmenter"), ctx.role("clip")
    images = [ctx.image(r["image"]) for r in rows]
    boxes = [np.array([s["box"] for s in r["subjects"]], np.float32).reshape(-1, 4) for r in rows]
    all_masks = ctx.timed(segmenter.segment, images, boxes)
    mask_views, box_views, texts = [], [], []
    for row, image, masks in zip(rows, images, all_masks):
        for subject, mask in zip(row["subjects"], masks):
            mask_views.append(masked(image, mask))
            box_views.append(crop(image, subject["box"]))
            texts.append(f"a photo of a {subject['category']}")
    if texts:
        text_emb = ctx.timed(clip.embed_texts, texts)
        mask_score = (ctx.timed(clip.embed_images, mask_views) * text_emb).sum(1)
        box_score = (ctx.timed(clip.embed_images, box_views) * text_emb).sum(1)
    kept, position = [], 0
    for row, image, masks in zip(rows, images, all_masks):
        width, height = image.size
        subjects, regions = [], []
        for subject, mask in zip(row["subjects"], masks):
            use_mask = bool(mask.any()) and mask_score[position] > box_score[position]
            position += 1
            region = mask if use_mask else box_to_mask(np.array(subject["box"]), height, width)
            regions.append(region)
            subjects.append({**subject, "mask": rle.encode(mask), "region": "mask" if use_mask else "box",
                             "area": float(region.mean())})
        grid = layout_grid(np.stack(regions), [s["id"] for s in subjects], lam=params.lam, grid=params.grid)
        kept.append({**row, "subjects": subjects, "layout": grid.tolist(), "layout_text": layout_to_text(grid, params.grid)})
    return kept


STAGE = Stage("layout", 1, process, roles=("segmenter", "clip"), reads=("layout",), writes=("subjects", "layout", "layout_text"),
              unit="subjects")
