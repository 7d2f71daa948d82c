"""rerender: each subject's crop is re-rendered by the editor in a new view or pose and becomes its
reference image, so references are not copies of the target. A reference whose DINO similarity to
the crop is above `max_dino` (a copy) or below `min_dino` (identity lost) is rejected and its
subject removed; a sample with fewer than `verify.min_subjects` left is dropped."""
from __future__ import annotations

import numpy as np

from music_model.images import crop, from_struct, to_struct
from tasks.engine import Stage, StageContext
from tasks.verify import renumber


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    params = ctx.spec.rerender
    editor, dino = ctx.role("editor"), ctx.role("dino")
    jobs = []
    for number, row in enumerate(rows):
        image = from_struct(row["image"])
        for subject in row["subjects"]:
            square = crop(image, subject["box"], params.crop_margin).resize((params.size, params.size))
            jobs.append((number, subject, square))
    crops = [c for _, _, c in jobs]
    references = ctx.timed(
        editor.edit, crops, [params.prompt.format(category=s["category"]) for _, s, _ in jobs],
        [ctx.seed(rows[n]["index"], str(s["id"])) for n, s, _ in jobs], width=params.size, height=params.size,
    )
    similarity = (ctx.timed(dino.embed_images, crops) * ctx.timed(dino.embed_images, references)).sum(1) if jobs else np.zeros(0)
    kept_subjects: dict[int, list[dict]] = {n: [] for n in range(len(rows))}
    rejected: dict[int, list[str]] = {n: [] for n in range(len(rows))}
    for (number, subject, _), reference, score in zip(jobs, references, similarity):
        if score > params.max_dino:
            rejected[number].append(f"{subject['category']}: copy ({score:.3f})")
        elif score < params.min_dino:
            rejected[number].append(f"{subject['category']}: identity lost ({score:.3f})")
        else:
            kept_subjects[number].append({**subject, "reference": to_struct(reference), "reference_dino": float(score)})
    kept = []
    for number, row in enumerate(rows):
        subjects = renumber(kept_subjects[number])
        if len(subjects) < ctx.spec.verify.min_subjects:
            ctx.drop(row, "too_few_references", "; ".join(rejected[number]))
            continue
        kept.append({**row, "subjects": subjects, "num_subjects": len(subjects)})
    return kept


STAGE = Stage("rerender", 1, process)
