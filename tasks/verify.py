"""verify: the VLM judges each detected box against its category; failed subjects are removed and
a sample with fewer than `min_subjects` left is dropped."""
from __future__ import annotations

from pydantic import BaseModel

from music_model.media.images import crop
from music_model.roles.structured import bounded_text
from tasks.engine import Stage, StageContext

PROMPT = "Is the main object in this image a {category}, shown whole and clearly? Answer and give a short reason."


class Verdict(BaseModel):
    match: bool
    reason: bounded_text(80)


def renumber(subjects: list[dict]) -> list[dict]:
    return [{**s, "id": i} for i, s in enumerate(subjects, 1)]


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    params = ctx.spec.verify
    vlm = ctx.role("vlm")
    jobs = []  # (row number, subject) for every subject of the shard, judged in one batched call
    for number, row in enumerate(rows):
        image = ctx.image(row["image"])
        jobs.extend((number, subject, crop(image, subject["box"], params.crop_margin)) for subject in row["subjects"])
    results = ctx.timed(
        vlm.generate, [[c] for _, _, c in jobs], [PROMPT.format(category=s["category"]) for _, s, _ in jobs], Verdict,
        [ctx.seed(rows[n]["index"], str(s["id"])) for n, s, _ in jobs],
    )
    passed: dict[int, list[dict]] = {n: [] for n in range(len(rows))}
    for (number, subject, _), result in zip(jobs, results):
        if not params.require_match or (result.ok and result.value.match):
            passed[number].append(subject)
    kept = []
    for number, row in enumerate(rows):
        subjects = renumber(passed[number])
        if len(subjects) < params.min_subjects:
            ctx.drop(row, "too_few_verified", f"{len(subjects)} of {len(row['subjects'])} subjects passed")
            continue
        kept.append({**row, "subjects": subjects, "num_subjects": len(subjects)})
    return kept


# 3: explicit sampling, schema-derived token budget
STAGE = Stage("verify", 3, process, roles=("vlm",), reads=("verify",), writes=("subjects", "num_subjects"), unit="subjects")
