"""detect: each subject category in the target gets its best-scoring box. A subject is removed
when it has no box; when that best box is under `min_box_area` of the image (a larger box of lower
score is no fallback: it is more often something else); or when its box and a higher-scoring
subject's coincide (IoU over `max_box_overlap`: one object named twice, as truck / pickup truck).
The subjects left keep the categories' order, numbered 1..k.

Drop: `too_few_detected`, fewer than `verify.min_subjects` subjects left; the detail counts the
categories kept and gives each removed one's reason."""
from __future__ import annotations

import numpy as np
from pydantic import Field

from data_specs.build import Section
from music_model.roles.detector import Detections
from music_model.subjects.decimate import box_area
from tasks.engine.contract import PublishedScore, Stage, StageContext, Threshold


class DetectParams(Section):
    min_box_area: float = Field(0.01, ge=0, lt=1, description="a subject whose best box is under this fraction of the "
                                                               "image is removed")
    max_box_overlap: float = Field(0.9, ge=0, le=1, description="two subjects whose boxes overlap more than this (IoU) "
                                                               "are one object named twice: the lower-scoring one is "
                                                               "removed (1: never)")
    box_threshold: float = Field(0.35, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)


def box_iou(a, b) -> float:
    """IoU of two normalised xyxy boxes."""
    overlap = box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = box_area(a) + box_area(b) - overlap
    return overlap / union if union > 0 else 0.0


def select_subjects(categories: list[str], found: Detections, min_box_area: float, max_box_overlap: float
                    ) -> tuple[list[dict], list[str]]:
    """One image's subjects from its detections, and why each category left out was removed."""
    best, removed = {}, []  # best: phrase -> (score, box)
    for phrase, category in enumerate(categories):
        own = np.flatnonzero(found.phrase_index == phrase)
        if not len(own):
            removed.append(f"{category}: no box")
            continue
        top = own[np.argmax(found.scores[own])]
        if box_area(found.boxes[top]) < min_box_area:
            removed.append(f"{category}: best box {box_area(found.boxes[top]):.4f} of the image")
            continue
        best[phrase] = (float(found.scores[top]), found.boxes[top])
    kept = []
    for phrase in sorted(best, key=lambda p: -best[p][0]):  # a box goes to the subject that scores it highest
        iou, twin = max(((box_iou(best[phrase][1], best[k][1]), k) for k in kept), default=(0.0, None))
        if iou > max_box_overlap:
            removed.append(f"{categories[phrase]}: the box of {categories[twin]} (IoU {iou:.2f})")
        else:
            kept.append(phrase)
    subjects = [{"id": number, "category": categories[phrase], "box": np.asarray(best[phrase][1], np.float32).tolist(),
                 "score": best[phrase][0], "area": box_area(best[phrase][1])}
                for number, phrase in enumerate(sorted(kept), 1)]
    return subjects, removed


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
        subjects, removed = select_subjects(row["categories"], found, params.min_box_area, params.max_box_overlap)
        if len(subjects) < ctx.spec.verify.min_subjects:
            counted = f"{len(subjects)} of {len(row['categories'])} categories kept"
            ctx.drop(row, "too_few_detected", "; ".join([counted, *removed]))
            continue
        kept.append({**row, "subjects": subjects, "num_subjects": len(subjects)})
    return kept


# 2: the area rule judges each category's best box (no fallback to a larger one); coincident boxes
# of two categories keep one subject
STAGE = Stage(
    "detect", 3, process, DetectParams, roles=("detector",), reads=("detect", "verify.min_subjects"),
    writes=("subjects", "num_subjects"), plan="subjects",
    thresholds=(Threshold("detect.box_threshold", "score", "below", "applied inside the detector, which returns no box "
                          "under it: the values are the subjects detect kept"),),
    published=(PublishedScore("detector_scores", "subject", "score",
                              "the detector's score of the subject's box for its category (detect)", "0 to 1",
                              lambda spec: f">= `detect.box_threshold` {spec.detect.box_threshold}"),),
)
