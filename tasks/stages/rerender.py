"""rerender: each subject's crop is re-rendered by the editor in a new view or pose and becomes its
reference image, so references are not copies of the target. A reference whose DINO similarity to
the crop is above `max_dino` (a copy) or below `min_dino` (identity lost) is rejected and its
subject removed; a sample with fewer than `verify.min_subjects` left is dropped. Every
candidate's similarity, kept or rejected, goes to the stage's scores table (`reference_dino`), so
`music calibrate` shows the whole distribution the two bounds cut.

Geometry (never a stretch): the crop is letterboxed on a neutral background into the FLUX Kontext
preferred resolution whose aspect is nearest its own (diffusers' `PREFERRED_KONTEXT_RESOLUTIONS`,
the ~1 MP sizes Kontext was trained at, scaled by `render_size / 1024` so tiny specs stay small);
the edited image is cut back to the crop's box and scaled so its longer side is `size`: the
reference keeps the crop's aspect. DINO compares the crop and the reference each padded to a
square, so its centre crop sees both whole and undistorted."""
from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from data_specs.build import Section
from music_model.media.images import crop, letterbox, square
from music_model.subjects import nouns
from tasks.engine.contract import PublishedScore, Stage, StageContext, Threshold
from tasks.stages.verify import renumber


class RerenderParams(Section):
    # {category}: one of the subject's category, in the singular ("sneaker" for "sneakers").
    prompt: str = "Show this {category} from a different viewpoint and in a different pose, on a plain background."
    size: int = Field(512, ge=16, description="a reference's longer side in pixels (its aspect is its crop's)")
    render_size: int = Field(1024, ge=16, description="Kontext renders at its preferred ~1 MP resolutions scaled by "
                                                       "render_size / 1024 (1024: as trained; tiny specs: small)")
    min_dino: float = Field(0.4, ge=-1, le=1, description="below: identity lost")
    max_dino: float = Field(0.95, ge=-1, le=1, description="above: a copy of the crop, not a new view")
    crop_margin: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> "RerenderParams":
        if self.min_dino >= self.max_dino:
            raise ValueError(f"min_dino ({self.min_dino}) must be below max_dino ({self.max_dino})")
        return self


KONTEXT_SIDE = 1024  # the side of Kontext's square preferred resolution, which render_size scales


def render_resolution(aspect: float, render_size: int, multiple: int) -> tuple[int, int]:
    """The (width, height) Kontext renders a crop of `aspect` (width / height) at: the preferred
    resolution of nearest aspect (ties: the smaller), scaled by `render_size / 1024` and rounded to
    `multiple` (at least one)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    scale = render_size / KONTEXT_SIDE
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (width, height))


def reference_size(aspect: float, longest: int) -> tuple[int, int]:
    """(width, height) of a reference of `aspect` whose longer side is `longest` pixels."""
    if aspect >= 1:
        return longest, max(1, round(longest / aspect))
    return max(1, round(longest * aspect)), longest


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    params = ctx.spec.rerender
    editor, dino = ctx.role("editor"), ctx.role("dino")
    jobs = []  # (row number, subject, crop, letterboxed editor input, the crop's box in it)
    for number, row in enumerate(rows):
        image = ctx.image(row["image"])
        for subject in row["subjects"]:
            cut = crop(image, subject["box"], params.crop_margin)
            size = render_resolution(cut.width / cut.height, params.render_size, editor.size_multiple)
            jobs.append((number, subject, cut, *letterbox(cut, size)))
    # The editor batches inputs of one size together and renders each at its input's size.
    edited = ctx.timed(
        editor.edit, [job[3] for job in jobs], [params.prompt.format(category=nouns.singular(s["category"])) for _, s, *_ in jobs],
        [ctx.seed(rows[n]["index"], str(s["id"])) for n, s, *_ in jobs],
    )
    references = [
        output.crop(box).resize(reference_size(cut.width / cut.height, params.size), Image.Resampling.BICUBIC)
        for (_, _, cut, _, box), output in zip(jobs, edited)
    ]
    if jobs:
        crops = ctx.timed(dino.embed_images, [square(job[2]) for job in jobs])
        similarity = (crops * ctx.timed(dino.embed_images, [square(r) for r in references])).sum(1)
    else:
        similarity = np.zeros(0)
    kept_subjects: dict[int, list[dict]] = {n: [] for n in range(len(rows))}
    rejected: dict[int, list[str]] = {n: [] for n in range(len(rows))}
    for (number, subject, *_), reference, score in zip(jobs, references, similarity):
        ctx.score(rows[number], "reference_dino", score, bool(params.min_dino <= score <= params.max_dino), subject)
        if score > params.max_dino:
            rejected[number].append(f"{subject['category']}: copy ({score:.3f})")
        elif score < params.min_dino:
            rejected[number].append(f"{subject['category']}: identity lost ({score:.3f})")
        else:
            kept_subjects[number].append({**subject, "reference": ctx.store_image(reference), "reference_dino": float(score)})
    kept = []
    for number, row in enumerate(rows):
        subjects = renumber(kept_subjects[number])
        if len(subjects) < ctx.spec.verify.min_subjects:
            ctx.drop(row, "too_few_references", "; ".join(rejected[number]))
            continue
        kept.append({**row, "subjects": subjects, "num_subjects": len(subjects)})
    return kept


# Version 2: letterboxed crops at Kontext's preferred resolutions, references in the crop's aspect.
# Version 3: every candidate's DINO similarity in the scores table.
STAGE = Stage(
    "rerender", 4, process, RerenderParams, roles=("editor", "dino"), reads=("rerender", "verify.min_subjects"),
    writes=("subjects", "num_subjects"), unit="subjects", plan="subjects", scores=("reference_dino",),
    thresholds=(Threshold("rerender.min_dino", "reference_dino", "below"), Threshold("rerender.max_dino", "reference_dino", "above")),
    published=(PublishedScore("reference_dino", "subject", "reference_dino",
                              "cosine of the `dino` role's embeddings of the re-rendered reference and the subject's crop "
                              "(rerender): low, identity lost; high, a copy of the crop", "-1 to 1",
                              lambda spec: f"`rerender.min_dino` {spec.rerender.min_dino} to `rerender.max_dino` {spec.rerender.max_dino}"),),
)
