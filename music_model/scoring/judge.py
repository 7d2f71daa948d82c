"""The judge: a VQAScore-style score (Lin et al., "Evaluating Text-to-Visual Generation with
Image-to-Text Generation", 2024) from an open VLM's p(yes), reported beside DINO / CLIP-I / CLIP-T
and never used to select a Pass@N candidate. It is this project's addition, not the paper's
(docs/FIDELITY.md): a metric that selects (CLIP) rewards the selector when it is also reported.

Per generated image (the metrics `data_specs.eval.JUDGE_METRICS`):
- `judge_subjects`: for each subject, p(yes) that the subject of its reference (shown first) is in
  the generated image (shown second); the mean over subjects, a missing subject counting what the
  VLM says.
- `judge_instruction`: p(yes) that the image follows the text (the CLIP-T text).
- `judge`: the mean of the two.
p(yes) is one forward pass (`yes_probability`: no sampling, no seed), so the judge is deterministic.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

SUBJECT_QUESTION = ("The first image shows a {category}. Is that same {category} in the second image? Answer Yes or No.")
INSTRUCTION_QUESTION = "Does this image show the following: {text} Answer Yes or No."


def judge_images(vlm, images: Sequence[Image.Image], references: Sequence[Sequence[Image.Image]],
                 categories: Sequence[Sequence[str]], texts: Sequence[str]) -> list[dict]:
    """One {judge_subjects, judge_instruction, judge} per image; image i's subjects are
    `references[i]` with `categories[i]`, its text `texts[i]`."""
    pairs, prompts, owner = [], [], []
    for i, (image, refs, names) in enumerate(zip(images, references, categories)):
        for reference, name in zip(refs, names):
            pairs.append([reference, image])
            prompts.append(SUBJECT_QUESTION.format(category=name or "subject"))
            owner.append(i)
    with vlm.lock:
        subject_p = vlm.yes_probability(pairs, prompts) if pairs else np.array([])
        text_p = vlm.yes_probability([[image] for image in images], [INSTRUCTION_QUESTION.format(text=t.strip()) for t in texts])
    owner_arr = np.asarray(owner)
    rows = []
    for i in range(len(images)):
        subjects = float(np.mean(subject_p[owner_arr == i])) if (owner_arr == i).any() else float("nan")
        rows.append({"judge_subjects": subjects, "judge_instruction": float(text_p[i]),
                     "judge": float(np.nanmean([subjects, text_p[i]]))})
    return rows
