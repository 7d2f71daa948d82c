"""Images as Hugging Face `Image` structs (`{bytes, path}`), crops and labelled overlays."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


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


def masked(image: Image.Image, mask: np.ndarray, fill: int = 128) -> Image.Image:
    """The image with everything outside `mask` painted grey, cropped to the mask's bounds."""
    pixels = np.array(image.convert("RGB"))
    pixels[~mask] = fill
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return Image.fromarray(pixels)
    return Image.fromarray(pixels[ys.min():ys.max() + 1, xs.min():xs.max() + 1])


def draw_labelled_boxes(image: Image.Image, boxes: list, labels: list[str]) -> Image.Image:
    """A copy of `image` with each box outlined and labelled, as the annotating VLM sees it."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(1, round(min(out.size) / 200))
    for box, label in zip(boxes, labels):
        left, top, right, bottom = pixel_box(box, *out.size)
        draw.rectangle([left, top, right - 1, bottom - 1], outline=(255, 0, 0), width=width)
        draw.text((left + 2, top + 2), label, fill=(255, 255, 0))
    return out
