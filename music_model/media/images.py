"""Images as Hugging Face `Image` structs (`{bytes, path}`), crops, letterboxing and labelled overlays."""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

NEUTRAL = (128, 128, 128)  # padding around a subject: no colour for a model to read as part of it
TAG_HEIGHT = 0.03  # a tag's letters are at least this fraction of the image height
# Box and tag colours, one per subject in turn, so a tag and its outline match where boxes overlap.
TAG_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
               (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (255, 225, 25), (170, 110, 40)]


def to_struct(image: Image.Image) -> dict:
    """PNG bytes (lossless, no metadata, so the same pixels give the same bytes)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def from_struct(struct: dict) -> Image.Image:
    image = Image.open(io.BytesIO(struct["bytes"]))
    image.load()
    return image.convert("RGB")


def pixel_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    """A normalised xyxy box as integer pixel bounds, at least one pixel wide and high."""
    x0, y0, x1, y1 = (float(v) for v in box)
    left, top = int(np.floor(x0 * width)), int(np.floor(y0 * height))
    right, bottom = max(int(np.ceil(x1 * width)), left + 1), max(int(np.ceil(y1 * height)), top + 1)
    return max(left, 0), max(top, 0), min(right, width), min(bottom, height)


def crop(image: Image.Image, box, margin: float = 0.0) -> Image.Image:
    """The region of a normalised box, grown by `margin` of its size on each side."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    return image.crop(pixel_box((x0 - dx, y0 - dy, x1 + dx, y1 + dy), *image.size))


def masked(image: Image.Image, mask: np.ndarray, fill: tuple[int, int, int] = NEUTRAL) -> Image.Image:
    """The image with everything outside `mask` painted `fill`."""
    pixels = np.array(image.convert("RGB"))
    pixels[~mask] = fill
    return Image.fromarray(pixels)


def letterbox(image: Image.Image, size: tuple[int, int], fill: tuple[int, int, int] = NEUTRAL
              ) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """`image` scaled to fit `size` (aspect kept, never stretched) and centred on a `fill` canvas;
    also the pixel box (left, top, right, bottom) it covers there."""
    fitted = ImageOps.contain(image.convert("RGB"), size, Image.Resampling.BICUBIC)
    left, top = (size[0] - fitted.width) // 2, (size[1] - fitted.height) // 2
    canvas = Image.new("RGB", size, fill)
    canvas.paste(fitted, (left, top))
    return canvas, (left, top, left + fitted.width, top + fitted.height)


def square(image: Image.Image, fill: tuple[int, int, int] = NEUTRAL) -> Image.Image:
    """`image` padded to a square on `fill` at its own scale: the whole subject, undistorted, for
    encoders that centre-crop to a square."""
    side = max(image.size)
    return letterbox(image, (side, side), fill)[0]


def subject_view(image: Image.Image, box, mask: np.ndarray | None = None) -> Image.Image:
    """A subject as an encoder that centre-crops to a square should see it: its box, grey outside
    `mask` when one is given, padded to a square. Mask and box views share one frame, so a score
    compares the region, not the framing, and the whole subject is inside the encoder's crop."""
    return square(crop(image if mask is None else masked(image, mask), box))


def tag_font(image_height: int, labels: list[str]) -> ImageFont.FreeTypeFont:
    """Pillow's scalable default font at the smallest size whose letters, in every one of `labels`,
    are at least `TAG_HEIGHT` of the image height (one pixel more for the anti-aliased edge)."""
    target = math.ceil(TAG_HEIGHT * image_height) + 1
    size = target
    while True:
        font = ImageFont.load_default(size=size)
        shortest = min(bottom - top for _, top, _, bottom in map(font.getbbox, labels or ["<s1>"]))
        if shortest >= target:
            return font
        size = max(size + 1, math.ceil(size * target / max(shortest, 1)))


def draw_labelled_boxes(image: Image.Image, boxes: list, labels: list[str]) -> Image.Image:
    """A copy of `image` with each box outlined and its label written on a filled tag of the same
    colour at the box's top-left corner (above the box when there is room, else inside it), as the
    annotating VLM sees it; a tag that would cover an earlier one moves down below it."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(1, round(min(out.size) / 200))
    font = tag_font(out.height, labels)
    pad = max(1, font.size // 6)
    placed: list[tuple[int, int, int, int]] = []
    for number, (box, label) in enumerate(zip(boxes, labels)):
        colour = TAG_COLOURS[number % len(TAG_COLOURS)]
        left, top, right, bottom = pixel_box(box, *out.size)
        draw.rectangle([left, top, right - 1, bottom - 1], outline=colour, width=width)
        x0, y0, x1, y1 = font.getbbox(label)
        tag_w, tag_h = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
        x = min(max(left, 0), max(out.width - tag_w, 0))
        y = top - tag_h if top - tag_h >= 0 else top
        while (below := [b for l, t, r, b in placed if x < r and x + tag_w > l and y < b and y + tag_h > t]) and y + tag_h < out.height:
            y = max(below)
        y = min(y, max(out.height - tag_h, 0))
        placed.append((x, y, x + tag_w, y + tag_h))
        light = sum(c * w for c, w in zip(colour, (0.299, 0.587, 0.114))) > 150
        draw.rectangle([x, y, x + tag_w - 1, y + tag_h - 1], fill=colour)
        draw.text((x + pad - x0, y + pad - y0), label, font=font, fill=(0, 0, 0) if light else (255, 255, 255))
    return out
