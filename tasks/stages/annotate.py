"""annotate: the VLM sees the target with its labelled boxes and writes the instruction (subjects
named by `<sN>` tokens) and the vision CoT (each subject's role and placement, their relations).

The prompt gives the image size and each box in the frame the VLM sees (`vlm.frame_size`: the
size its processor resizes the image to), so its answer's coordinates and the prompt's agree, and
ends with the answer's JSON fields and bounds. Every text is ended at a whole word, with no cut
`<sN` tag (`structured.end_at_word`); a text with nothing left counts as not written.

Repair rules, applied in this order: a sample whose instruction names an unknown subject is
dropped; subjects the instruction does not name are appended as "with <s1> (dog), ..."; CoT
entries with unknown IDs are removed and missing ones are filled from the subject's category and
box position; relations that name unknown subjects are removed."""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Annotated

from pydantic import BaseModel, Field

from data_specs.build import Section
from music_model.media.images import draw_labelled_boxes, pixel_box
from music_model.roles.structured import bounded_text, describe_schema, end_at_word
from music_model.subjects.decimate import mentioned, token
from tasks.engine.contract import Stage, StageContext


class AnnotateParams(Section):
    max_instruction_chars: int = Field(300, ge=16, le=4000)
    max_relations: int = Field(6, ge=0, le=32)


PROMPT = (
    "The image ({width}x{height} pixels) shows these subjects, each outlined in its own colour and labelled with "
    "its tag; the box of each is given as [left, top, right, bottom] in pixels: {subjects}.\n"
    "Write an instruction that asks an image generator to create this image from reference images of the "
    "subjects, naming each subject only by its tag (<s1>, <s2>, ...). Then, for each subject, state its role in "
    "the scene and where it is placed, and list the relations between subjects."
)


NOTE_CHARS = 80  # a subject's role, and its placement
RELATION_CHARS = 100


@lru_cache(maxsize=None)  # one class per bound, so its compiled grammar is cached
def annotation_schema(max_instruction: int, max_relations: int) -> type[BaseModel]:
    class SubjectNote(BaseModel):
        id: Annotated[int, Field(ge=1, le=12)] = Field(description="the number N of the subject's tag <sN>")
        role: bounded_text(NOTE_CHARS) = Field(description="its role in the scene")
        placement: bounded_text(NOTE_CHARS) = Field(description="where it is placed")

    class Annotation(BaseModel):
        instruction: bounded_text(max_instruction) = Field(description="the instruction, naming subjects only by their tags")
        subjects: Annotated[list[SubjectNote], Field(max_length=12)] = Field(description="one entry per subject")
        relations: Annotated[list[bounded_text(RELATION_CHARS)], Field(max_length=max_relations)] = Field(
            description="relations between subjects, naming them by their tags")

    return Annotation


def prompt(subjects: list[dict], width: int, height: int, schema: type[BaseModel]) -> str:
    """The annotate prompt: the image size and each subject's tag, category and pixel box, in the
    `width` x `height` frame the VLM sees the image in; then the answer's fields and bounds."""
    listed = "; ".join(f"{token(s['id'])} {s['category']} [{', '.join(str(v) for v in pixel_box(s['box'], width, height))}]"
                       for s in subjects)
    return PROMPT.format(width=width, height=height, subjects=listed) + "\n" + describe_schema(schema)


def placement_words(box) -> str:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    return f"{vertical} {horizontal} of the image"


def repair(annotation: BaseModel, subjects: list[dict], max_instruction: int) -> tuple[str, dict] | None:
    """The instruction and CoT after the repair rules, or None when the instruction is unusable;
    each text first ended at a whole word (a note or relation with nothing left is left out)."""
    ids = {s["id"] for s in subjects}
    instruction = end_at_word(annotation.instruction, max_instruction).strip()
    if not mentioned(instruction) <= ids:
        return None
    missing = [s for s in subjects if s["id"] not in mentioned(instruction)]
    if missing:
        instruction = (instruction + " with " + ", ".join(f"{token(s['id'])} ({s['category']})" for s in missing)).lstrip()
    notes = {}
    for note in annotation.subjects:
        role, placement = end_at_word(note.role, NOTE_CHARS), end_at_word(note.placement, NOTE_CHARS)
        if note.id in ids and note.id not in notes and role and placement and mentioned(role + placement) <= ids:
            notes[note.id] = {"id": note.id, "role": role, "placement": placement}
    cot_subjects = [
        notes.get(s["id"], {"id": s["id"], "role": s["category"], "placement": placement_words(s["box"])}) for s in subjects
    ]
    relations = [r for r in (end_at_word(r, RELATION_CHARS) for r in annotation.relations) if r and mentioned(r) <= ids]
    return instruction, {"subjects": cot_subjects, "relations": relations}


def process(rows: list[dict], ctx: StageContext) -> list[dict]:
    params = ctx.spec.annotate
    vlm = ctx.role("vlm")
    schema = annotation_schema(params.max_instruction_chars, params.max_relations)
    images, prompts = [], []
    for row in rows:
        image = ctx.image(row["image"])
        labels = [token(s["id"]) for s in row["subjects"]]
        images.append([draw_labelled_boxes(image, [s["box"] for s in row["subjects"]], labels)])
        try:
            frame = vlm.frame_size(*image.size)
        except ValueError:  # an image the processor rejects: generate fails its row, with the reason
            frame = image.size
        prompts.append(prompt(row["subjects"], *frame, schema))
    results = ctx.timed(vlm.generate, images, prompts, schema, [ctx.seed(r["index"]) for r in rows])
    kept = []
    for row, result in zip(rows, results):
        if not result.ok:
            ctx.drop(row, "vlm_invalid_output", result.error or "")
            continue
        repaired = repair(result.value, row["subjects"], params.max_instruction_chars)
        if repaired is None:
            ctx.drop(row, "unknown_subject_in_instruction", result.value.instruction)
            continue
        instruction, cot = repaired
        kept.append({**row, "instruction": instruction, "cot": json.dumps(cot, sort_keys=True)})
    return kept


# Version 2: legible colour tags, pixel boxes in the prompt, schema-derived token budget, explicit sampling.
# Version 3: boxes in the frame the VLM sees, the answer's fields and bounds in the prompt, texts
# ended at a whole word.
STAGE = Stage("annotate", 3, process, AnnotateParams, roles=("vlm",), reads=("annotate",), writes=("instruction", "cot"))
