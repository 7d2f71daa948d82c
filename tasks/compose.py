"""compose: sample categories per source image; the LLM keeps plausible combinations and writes
the scene caption.

A category is named everywhere (FLUX caption prompt, GroundingDINO phrase, CLIP texts, published
`categories`) by its display name: the curated table `data_specs/data/objects365_display_names.tsv`
for Objects365 (one name per category, the list's typos and synonym slashes resolved); a name the
table does not hold (a custom category file's) is used as written."""
from __future__ import annotations

import csv
import random
from functools import lru_cache

from pydantic import BaseModel

from data_specs import shipped
from data_specs.build import load_categories
from music_model.roles.structured import bounded_text
from tasks.engine import Stage, StageContext, sample_id

PROMPT = (
    "Objects: {objects}.\n"
    "Could all of these objects plausibly appear together, each clearly visible, in one realistic photo? "
    "If yes, write a one-sentence caption of such a photo that names every object."
)


@lru_cache(maxsize=1)
def display_names() -> dict[str, str]:
    """Objects365 category -> display name, from the shipped table."""
    with shipped("data/objects365_display_names.tsv").open(newline="") as table:
        return {row["original"]: row["display"] for row in csv.DictReader(table, delimiter="\t", quoting=csv.QUOTE_NONE)}


def display_name(category: str) -> str:
    """The name a subject of `category` goes by in prompts, detection phrases and CLIP texts."""
    return display_names().get(category, category.strip())


@lru_cache(maxsize=None)  # one class per bound, so its compiled grammar is cached
def composition_schema(max_chars: int) -> type[BaseModel]:
    class Composition(BaseModel):
        plausible: bool
        caption: bounded_text(max_chars)

    return Composition


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    spec = ctx.spec
    names = load_categories(spec.categories, max(spec.subject_counts))
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


# Version 2: display names from the curated table (edit the table: bump the version).
STAGE = Stage("compose", 2, process, roles=("llm",), reads=("compose", "name", "seed", "subject_counts", "categories"),
              writes=("id", "source_id", "categories", "num_subjects", "caption"))
