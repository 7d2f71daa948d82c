"""compose: sample categories per source image; the LLM keeps plausible combinations and writes
the scene caption.

A category is named everywhere (FLUX caption prompt, GroundingDINO phrase, CLIP texts, published
`categories`) by its display name: the curated table `data_specs/data/objects365_display_names.tsv`
for Objects365 (one name per category, the list's typos and synonym slashes resolved); a name the
table does not hold (a custom category file's) is used as written.

The caption is ended at a whole word (`structured.end_at_word`) and, with `require_named`, must name
every category (case-insensitive, singular or plural as English inflects it: "knives", "people", "a cookie"
for "cookies"; `music_model.subjects.nouns`); a caption that does not is written
again with a new seed, up to `caption_attempts` times.

Drop reasons: `llm_invalid_output`, `implausible_combination`, `caption_empty` (no whole word within
`max_caption_chars`), `caption_misses_category` (the detail names the missing categories)."""
from __future__ import annotations

import csv
import random
from functools import lru_cache

from pydantic import BaseModel, Field

from data_specs import shipped
from data_specs.build import Section, load_categories
from music_model.roles.structured import bounded_text, describe_schema, end_at_word
from music_model.subjects import nouns
from tasks.engine.contract import Stage, StageContext, sample_id


class ComposeParams(Section):
    """Sample categories, then the LLM keeps plausible combinations and writes the scene caption."""

    max_caption_chars: int = Field(240, ge=16, le=2000)
    require_plausible: bool = Field(True, description="drop combinations the LLM judges implausible")
    require_named: bool = Field(True, description="retry, then drop, a caption that does not name every category")
    caption_attempts: int = Field(3, ge=1, description="captions tried (each with a new seed) before a sample is dropped")


PROMPT = (
    "Objects: {objects}.\n"
    "Could all of these objects plausibly appear together, each clearly visible, in one realistic photo? "
    "If yes, write a one-sentence caption of such a photo that names every object."
)


def prompt(categories: list[str], schema: type[BaseModel]) -> str:
    return PROMPT.format(objects=", ".join(categories)) + "\n" + describe_schema(schema)


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
        plausible: bool = Field(description="whether the objects can plausibly appear together in one photo")
        caption: bounded_text(max_chars) = Field(description="one sentence that names every object")

    return Composition


def missing_categories(caption: str, categories: list[str]) -> list[str]:
    """The categories `caption` does not name: case-insensitive, whole words, singular or plural."""
    return [c for c in categories if not nouns.names(caption, c)]


def caption_problem(caption: str, categories: list[str], params) -> tuple[str, str] | None:
    """Why a caption (ended at a word) cannot be used, as (reason, detail), or None."""
    if not caption:
        return "caption_empty", f"no whole word within {params.max_caption_chars} characters"
    missing = missing_categories(caption, categories) if params.require_named else []
    if missing:
        return "caption_misses_category", f"{', '.join(missing)} not in: {caption}"
    return None


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
    params = spec.compose
    schema = composition_schema(params.max_caption_chars)
    kept, pending = [], drafts
    for attempt in range(params.caption_attempts):
        if not pending:
            break
        prompts = [prompt(d["categories"], schema) for d in pending]
        results = ctx.timed(llm.generate, prompts, schema, [ctx.seed(d["index"], f"llm {attempt}") for d in pending])
        retry = []
        for draft, result in zip(pending, results):
            if not result.ok:
                ctx.drop(draft, "llm_invalid_output", result.error or "")
                continue
            if params.require_plausible and not result.value.plausible:
                ctx.drop(draft, "implausible_combination", ", ".join(draft["categories"]))
                continue
            caption = end_at_word(result.value.caption, params.max_caption_chars)
            problem = caption_problem(caption, draft["categories"], params)
            if problem is None:
                kept.append({**draft, "source_id": draft["id"], "num_subjects": len(draft["categories"]), "caption": caption})
            elif attempt + 1 < params.caption_attempts:
                retry.append(draft)
            else:
                ctx.drop(draft, *problem)
        pending = retry
    return sorted(kept, key=lambda row: row["index"])


# Version 2: display names from the curated table (edit the table: bump the version).
# Version 3: the prompt states the JSON fields and bounds; captions end at a word, and one that
# misses a category is retried, then dropped.
STAGE = Stage("compose", 4, process, ComposeParams, roles=("llm",), reads=("compose", "name", "seed", "subject_counts", "categories"),
              writes=("id", "source_id", "categories", "num_subjects", "caption"))
