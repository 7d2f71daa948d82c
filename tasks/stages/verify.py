"""verify: the VLM judges each detected box and its label, as the paper asks: is the outlined box
a {category}? It reads the answer's yes/no token probabilities from one forward pass (no sampling,
so a borderline crop gets the same verdict on every run) and keeps a subject when p(yes) reaches
`min_confidence`, storing p(yes) as the subject's `verify_confidence`. A sample with fewer than
`min_subjects` kept is dropped (`too_few_verified`). Every candidate's p(yes), kept or not, goes
to the stage's scores table, for `music calibrate`."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw
from pydantic import Field

from data_specs.build import Section
from music_model.media.images import TAG_COLOURS, crop, pixel_box
from music_model.subjects import nouns
from tasks.engine.contract import PublishedScore, Stage, StageContext, Threshold


class VerifyParams(Section):
    min_subjects: int = Field(2, ge=1, description="a sample with fewer verified subjects is dropped")
    crop_margin: float = Field(0.1, ge=0, le=1, description="context around a box in the crop the VLM judges")
    require_match: bool = Field(True, description="remove subjects the VLM rejects (tiny specs: a random VLM's verdict)")
    min_confidence: float = Field(0.5, ge=0, le=1, description="the VLM's p(yes) a subject needs to be kept")


# Not "shown whole and clearly": occluded and interacting subjects are what multi-subject scenes are made of.
PROMPT = ("A detector found an object in this image and labelled it \"{category}\"; the red box outlines it. "
          "Is the box and its label correct, that is, does the red box hold {one}? Answer Yes or No.")
BOX_COLOUR = TAG_COLOURS[0]


def prompt(category: str) -> str:
    """The question for a box labelled `category`: the label as detected, the object in a sentence."""
    return PROMPT.format(category=category, one=nouns.with_article(category))


def outlined_crop(image: Image.Image, box, margin: float) -> Image.Image:
    """The crop the VLM judges: the box grown by `margin` of its size, with the box outlined."""
    outlined = image.copy()
    left, top, right, bottom = pixel_box(box, *outlined.size)
    width = max(1, round(max(right - left, bottom - top) / 100))
    ImageDraw.Draw(outlined).rectangle([left, top, right - 1, bottom - 1], outline=BOX_COLOUR, width=width)
    return crop(outlined, box, margin)


def renumber(subjects: list[dict]) -> list[dict]:
    return [{**s, "id": i} for i, s in enumerate(subjects, 1)]


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    params = ctx.spec.verify
    vlm = ctx.role("vlm")
    jobs = []  # (row number, subject, crop) for every subject of the shard, judged in one batched call
    for number, row in enumerate(rows):
        image = ctx.image(row["image"])
        jobs.extend((number, subject, outlined_crop(image, subject["box"], params.crop_margin)) for subject in row["subjects"])
    confidences = ctx.timed(vlm.yes_probability, [[c] for _, _, c in jobs], [prompt(s["category"]) for _, s, _ in jobs])
    passed: dict[int, list[dict]] = {n: [] for n in range(len(rows))}
    for (number, subject, _), confidence in zip(jobs, confidences):
        readable = not math.isnan(confidence)  # NaN: the processor rejected the crop
        confident = readable and confidence >= params.min_confidence
        if readable:
            ctx.score(rows[number], "verify_confidence", confidence, confident, subject)
        if confident or not params.require_match:
            passed[number].append({**subject, "verify_confidence": float(confidence) if readable else None})
    kept = []
    for number, row in enumerate(rows):
        subjects = renumber(passed[number])
        if len(subjects) < params.min_subjects:
            ctx.drop(row, "too_few_verified", f"{len(subjects)} of {len(row['subjects'])} subjects passed")
            continue
        kept.append({**row, "subjects": subjects, "num_subjects": len(subjects)})
    return kept


# 4: the paper's question (box and label correct) on the crop with its box drawn, decided by p(yes)
# from one forward pass against min_confidence (was: a sampled yes/no and an unused reason).
STAGE = Stage(
    "verify", 5, process, VerifyParams, roles=("vlm",), reads=("verify",), writes=("subjects", "num_subjects"),
    unit="subjects", plan="subjects", scores=("verify_confidence",),
    thresholds=(Threshold("verify.min_confidence", "verify_confidence", "below"),),
    published=(PublishedScore("verify_confidences", "subject", "verify_confidence",
                              "the VLM's p(yes) that the outlined box and its label are correct (verify)", "0 to 1",
                              lambda spec: f">= `verify.min_confidence` {spec.verify.min_confidence}"
                              if spec.verify.require_match else "any (verify.require_match off)"),),
)
