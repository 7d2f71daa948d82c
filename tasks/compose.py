"""compose: sample categories per source image; the LLM keeps plausible combinations and writes
the scene caption."""
from __future__ import annotations

from functools import lru_cache

import random

from pydantic import BaseModel

from music_model.structured import bounded_text
from tasks.engine import Stage, StageContext, sample_id

PROMPT = (
    "Objects: {objects}.\n"
    "Could all of these objects plausibly appear together, each clearly visible, in one realistic photo? "
    "If yes, write a one-sentence caption of such a photo that names every object."
)


def display_name(category: str) -> str:
    """Objects365 lists synonyms as `a/b`; the first one names the subject in prompts."""
    return category.split("/")[0].strip().lower()


@lru_cache(maxsize=None)  # one class per bound, so its compiled grammar is cached
def composition_schema(max_chars: int) -> type[BaseModel]:
    class Composition(BaseModel):
        plausible: bool
        caption: bounded_text(max_chars)

    return Composition


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    spec = ctx.spec
    names = spec.load_categories()
    counts, weights = zip(*spec.subject_counts.items())
    drafts = []
    for row in rows:
        rng = random.Random(ctx.seed(row["index"]))
        count = rng.choices(counts, weights=weights)[0]
        categories = [display_name(c) for c in rng.sample(names, count)]
        drafts.append({"index": row["index"], "id": sample_id(spec, row["index"]), "categories": categories})
    llm = ctx.role("llm")
    schema = composition_schema(spec.compose.max_caption_chars)
    prompts = [PROMPT.format(objects=", ".join(d["categories"])) for d in drafts]
    results = ctx.timed(llm.generate, prompts, schema, [ctx.seed(d["index"], "llm") for d in drafts])
    kept = []
    for draft, result in zip(drafts, results):
        if not result.ok:
            ctx.drop(draft, "llm_invalid_output", result.error or "")
        elif spec.compose.require_plausible and not result.value.plausible:
            ctx.drop(draft, "implausible_combination", ", ".join(draft["categories"]))
        else:
            kept.append({**draft, "source_id": draft["id"], "num_subjects": len(draft["categories"]), "caption": result.value.caption})
    return kept


STAGE = Stage("compose", 1, process)
