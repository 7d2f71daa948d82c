"""detect: one box per subject category in the target; boxes under `min_box_area` are dropped,
a subject with no box is removed, a sample with fewer than `verify.min_subjects` is dropped."""
from __future__ import annotations

import numpy as np

from music_model.subjects.decimate import box_area
from tasks.engine import Stage, StageContext


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    params = ctx.spec.detect
    detector = ctx.role("detector")
    images = [ctx.image(r["image"]) for r in rows]
    detections = ctx.timed(
        detector.detect, images, [r["categories"] for r in rows],
        box_threshold=params.box_threshold, text_threshold=params.text_threshold,
    )
    kept = []
    for row, found in zip(rows, detections):
        subjects = []
        for phrase, category in enumerate(row["categories"]):
            candidates = [
                (float(score), box) for box, score, index in zip(found.boxes, found.scores, found.phrase_index)
                if index == phrase and box_area(box) >= params.min_box_area
            ]
            if not candidates:
                continue
            score, box = max(candidates, key=lambda c: c[0])
            subjects.append({"id": len(subjects) + 1, "category": category, "box": np.asarray(box, np.float32).tolist(),
                             "score": score, "area": box_area(box)})
        if len(subjects) < ctx.spec.verify.min_subjects:
            ctx.drop(row, "too_few_detected", f"{len(subjects)} of {len(row['categories'])} categories found")
            continue
        kept.append({**row, "subjects": subjects, "num_subjects": len(subjects)})
    return kept


STAGE = Stage("detect", 1, process, roles=("detector",), reads=("detect", "verify.min_subjects"),
              writes=("subjects", "num_subjects"))
