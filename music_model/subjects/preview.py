"""Preview sheets: one PNG per sample for a person to judge a build at a glance.

A sheet shows, top to bottom: the sample's ID line; the target as the annotating VLM saw it (each
box outlined with its `<sN>` tag) beside the target with the layout grid over it (each cell tinted
in its subject's colour and numbered with its ID); every reference with its tag and category; then
the instruction, the CoT and the caption. Colours follow `images.TAG_COLOURS` by subject order, so
a box, its layout cells and its reference share one colour.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from music_model.media.images import TAG_COLOURS, draw_labelled_boxes, from_struct, letterbox
from music_model.subjects.decimate import token

PANEL = 448  # side of the two target panels, in pixels
THUMB = 160  # side of a reference thumbnail
MARGIN = 16
TEXT_SIZE = 15
INK, MUTED, PAPER = (20, 20, 20), (110, 110, 110), (255, 255, 255)


@dataclass
class SheetSample:
    """What a sheet shows; `boxes` (normalised xyxy) may be empty when the source has none."""

    id: str
    target: Image.Image
    categories: list[str]
    references: list[Image.Image]
    layout: list[int]
    instruction: str
    cot: str
    boxes: list = field(default_factory=list)
    caption: str = ""
    note: str = ""  # one more header line (subject count, source, ...)


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Lines of at most `width` pixels, breaking at spaces (a longer word is cut by characters)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width:
                cut = max(1, int(len(word) * width / font.getlength(word)))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def layout_overlay(image: Image.Image, layout: list[int], grid: int) -> Image.Image:
    """`image` with the grid drawn over it: each labelled cell tinted in its subject's colour and
    numbered with its subject ID; background cells left clear."""
    base = image.convert("RGBA")
    tint = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(tint)
    edges_x = np.round(np.linspace(0, base.width, grid + 1)).astype(int)
    edges_y = np.round(np.linspace(0, base.height, grid + 1)).astype(int)
    font = _font(max(10, base.height // (grid * 2)))
    for cell, subject in enumerate(layout):
        row, col = divmod(cell, grid)
        box = [edges_x[col], edges_y[row], edges_x[col + 1] - 1, edges_y[row + 1] - 1]
        if subject:
            colour = TAG_COLOURS[(subject - 1) % len(TAG_COLOURS)]
            draw.rectangle(box, fill=(*colour, 110))
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            draw.text(centre, str(subject), font=font, fill=(255, 255, 255, 255), anchor="mm",
                      stroke_width=2, stroke_fill=(0, 0, 0, 255))
    for x in edges_x:
        draw.line([(min(x, base.width - 1), 0), (min(x, base.width - 1), base.height)], fill=(255, 255, 255, 160), width=1)
    for y in edges_y:
        draw.line([(0, min(y, base.height - 1)), (base.width, min(y, base.height - 1))], fill=(255, 255, 255, 160), width=1)
    return Image.alpha_composite(base, tint).convert("RGB")


def render_sheet(sample: SheetSample, width: int = 2 * PANEL + 3 * MARGIN) -> Image.Image:
    """The preview sheet of one sample as an RGB image `width` pixels wide."""
    grid = int(round(len(sample.layout) ** 0.5))
    if grid * grid != len(sample.layout):
        raise ValueError(f"{sample.id}: layout has {len(sample.layout)} cells, not a square grid")
    if len(sample.references) != len(sample.categories):
        raise ValueError(f"{sample.id}: {len(sample.references)} references for {len(sample.categories)} categories")
    text_font, head_font = _font(TEXT_SIZE), _font(TEXT_SIZE + 5)
    inner = width - 2 * MARGIN
    tags = [token(k + 1) for k in range(len(sample.categories))]
    # 1. The two target panels: tags drawn at the target's own resolution, as the VLM saw them.
    boxed = draw_labelled_boxes(sample.target, sample.boxes, tags) if sample.boxes else sample.target
    panel = (min(PANEL, (inner - MARGIN) // 2),) * 2
    left = letterbox(boxed, panel, PAPER)[0]
    fitted, (x0, y0, x1, y1) = letterbox(sample.target, panel, PAPER)
    right = fitted.copy()
    right.paste(layout_overlay(fitted.crop((x0, y0, x1, y1)), sample.layout, grid), (x0, y0))
    # 2. Text blocks, wrapped to the sheet.
    try:
        cot = json.dumps(json.loads(sample.cot), ensure_ascii=False)
    except (TypeError, ValueError):
        cot = sample.cot or ""
    blocks = [("Instruction", sample.instruction or ""), ("CoT", cot)] + ([("Caption", sample.caption)] if sample.caption else [])
    wrapped = [(title, _wrap(text, text_font, inner)) for title, text in blocks]
    line_h = TEXT_SIZE + 5
    per_row = max(1, (inner + MARGIN) // (THUMB + MARGIN))
    ref_rows = -(-len(sample.references) // per_row)
    height = (MARGIN + 2 * line_h + MARGIN + panel[1] + MARGIN + ref_rows * (THUMB + 2 * line_h + MARGIN)
              + sum((1 + len(lines)) * line_h + MARGIN for _, lines in wrapped) + MARGIN)
    sheet = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(sheet)
    y = MARGIN
    draw.text((MARGIN, y), sample.id, font=head_font, fill=INK)
    draw.text((MARGIN, y + line_h + 2), sample.note or f"{len(sample.categories)} subjects", font=text_font, fill=MUTED)
    y += 2 * line_h + MARGIN
    sheet.paste(left, (MARGIN, y))
    sheet.paste(right, (MARGIN + panel[0] + MARGIN, y))
    y += panel[1] + MARGIN
    # 3. References, each with its tag and category under a bar in its subject's colour.
    for k, (reference, category) in enumerate(zip(sample.references, sample.categories)):
        row, col = divmod(k, per_row)
        x = MARGIN + col * (THUMB + MARGIN)
        top = y + row * (THUMB + 2 * line_h + MARGIN)
        sheet.paste(letterbox(reference, (THUMB, THUMB), PAPER)[0], (x, top))
        draw.rectangle([x, top + THUMB + 2, x + THUMB - 1, top + THUMB + 6], fill=TAG_COLOURS[k % len(TAG_COLOURS)])
        label = _wrap(f"{tags[k]} {category}", text_font, THUMB)[0]
        draw.text((x, top + THUMB + 9), label, font=text_font, fill=INK)
    y += ref_rows * (THUMB + 2 * line_h + MARGIN)
    for title, lines in wrapped:
        draw.text((MARGIN, y), title, font=head_font, fill=INK)
        y += line_h
        for line in lines:
            draw.text((MARGIN, y), line, font=text_font, fill=INK)
            y += line_h
        y += MARGIN
    return sheet


def from_published(row: dict) -> SheetSample:
    """A sheet of a published training-set row (`data/train-*.parquet`)."""
    return SheetSample(
        id=row["id"], target=from_struct(row["image"]), categories=list(row["categories"]),
        references=[from_struct(r) for r in row["references"]], layout=list(row["layout"]), instruction=row["instruction"],
        cot=row["cot"], boxes=list(row["boxes"]), caption=row["caption"],
        note=f"{row['num_subjects']} subjects; source {row['source_id']}")


def from_case(row: dict) -> SheetSample:
    """A sheet of an MSIC case (`data/test-*.parquet`); the CLIP-T prompt shown under the caption."""
    return SheetSample(
        id=row["case_id"], target=from_struct(row["target"]), categories=list(row["categories"]),
        references=[from_struct(r) for r in row["references"]], layout=list(row["layout"]), instruction=row["instruction"],
        cot=row["cot"], boxes=list(row.get("boxes") or []), caption=f"{row['caption']}\nCLIP-T prompt: {row['prompt']}",
        note=f"{row['subject_count']} subjects; sample {row['sample_id']}")
