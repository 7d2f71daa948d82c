"""The 8x8 spatial layout: subject regions (masks or boxes) projected onto a grid.

For every subject s and cell c the IoU between the region and the cell is computed; a cell is a
candidate for s when IoU > tau, with tau = lambda * mean IoU over the image's overlapping
(subject, cell) pairs (paper: lambda = 0.05). A cell claimed by several subjects goes to the one
with the highest IoU (ties: the smaller subject ID). A subject left with no cell gets its best
cell that is background or not the last cell of another subject, so every subject is placed
(the repair rule). 0 means background.
"""
from __future__ import annotations

import re

import numpy as np

from music_model.media import masks as rle

GRID = 8


def _cell_edges(length: int, grid: int) -> np.ndarray:
    return np.round(np.linspace(0, length, grid + 1)).astype(int)


def box_to_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """A bool mask of a normalised xyxy box at (height, width), at least one pixel."""
    x0, y0, x1, y1 = box
    left, right = int(np.floor(x0 * width)), int(np.ceil(x1 * width))
    top, bottom = int(np.floor(y0 * height)), int(np.ceil(y1 * height))
    right, bottom = max(right, left + 1), max(bottom, top + 1)
    mask = np.zeros((height, width), bool)
    mask[max(top, 0):min(bottom, height), max(left, 0):min(right, width)] = True
    return mask


def cell_ious(masks: np.ndarray, grid: int = GRID) -> np.ndarray:
    """IoU of every (subject, cell): masks (n, H, W) bool -> (n, grid*grid) float64."""
    n, height, width = masks.shape
    rows, cols = _cell_edges(height, grid), _cell_edges(width, grid)
    # Pixel counts of each mask inside each cell, by summing blocks between the cell edges.
    per_row = np.add.reduceat(masks.astype(np.int64), rows[:-1], axis=1)
    inside = np.add.reduceat(per_row, cols[:-1], axis=2).reshape(n, grid * grid)
    cell_area = np.outer(np.diff(rows), np.diff(cols)).reshape(-1)
    mask_area = masks.reshape(n, -1).sum(1)
    union = mask_area[:, None] + cell_area[None, :] - inside
    return np.where(union > 0, inside / np.maximum(union, 1), 0.0)


def layout_grid(masks: np.ndarray, subject_ids: list[int], lam: float = 0.05, grid: int = GRID) -> np.ndarray:
    """The grid (grid*grid int) of subject IDs (0 = background) for the subjects' masks."""
    if len(subject_ids) != len(masks):
        raise ValueError(f"{len(subject_ids)} subject IDs for {len(masks)} masks")
    layout = np.zeros(grid * grid, np.int64)
    if len(masks) == 0:
        return layout
    ious = cell_ious(masks, grid)
    positive = ious[ious > 0]
    tau = lam * positive.mean() if positive.size else 0.0
    candidate = np.where(ious > tau, ious, -1.0)
    # argmax picks the first maximum, so ties go to the subject listed first (the smaller ID).
    order = np.argsort(subject_ids, kind="stable")
    best = order[np.argmax(candidate[order], axis=0)]
    claimed = candidate[best, np.arange(grid * grid)] > 0
    ids = np.asarray(subject_ids)
    layout[claimed] = ids[best[claimed]]
    for row, subject in enumerate(ids):
        if (layout == subject).any():
            continue
        for cell in np.argsort(-ious[row], kind="stable"):
            owner = layout[cell]
            if owner == 0 or (layout == owner).sum() > 1:
                layout[cell] = subject
                break
    return layout


def subject_regions(subjects: list[dict], height: int, width: int) -> np.ndarray:
    """The (n, height, width) regions the layout stage chose: each subject's mask (RLE) where its
    `region` is "mask", else its box."""
    regions = [rle.decode(s["mask"]) if s.get("region") == "mask" else box_to_mask(np.asarray(s["box"], float), height, width)
               for s in subjects]
    return np.stack(regions) if regions else np.zeros((0, height, width), bool)


def layout_to_text(layout: np.ndarray, grid: int = GRID) -> str:
    """`grid` lines of `grid` space-separated subject IDs (0 = background)."""
    cells = np.asarray(layout).reshape(grid, grid)
    return "\n".join(" ".join(str(int(v)) for v in row) for row in cells)


def text_to_layout(text: str, grid: int = GRID) -> np.ndarray:
    """Inverse of `layout_to_text`; raises ValueError naming what is wrong."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) != grid:
        raise ValueError(f"the layout has {len(lines)} rows, expected {grid}")
    values = []
    for number, line in enumerate(lines, 1):
        cells = line.split()
        if len(cells) != grid or not all(re.fullmatch(r"\d+", c) for c in cells):
            raise ValueError(f"layout row {number} is not {grid} non-negative integers: {line!r}")
        values.extend(int(c) for c in cells)
    return np.array(values, np.int64)
