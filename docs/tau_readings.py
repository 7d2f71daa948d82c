"""tau = lambda * mean IoU under its three readings, on a hand-made 3-subject scene (as boxes and as
the ellipses inscribed in them, a stand-in for segmentation masks), on the same three subjects
placed at random, and on the boxes of a published sample. docs/FIDELITY.md quotes the output.

The paper labels a cell with a subject when their IoU exceeds tau = lambda * mean IoU, without
saying what the mean runs over. Readings: (1) the (subject, cell) pairs that overlap (what
music_model.subjects.layout does), (2) all (subject, cell) pairs, (3) each subject's own 64 cells (one tau
per subject). Usage: python docs/tau_readings.py [a published dataset folder]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from music_model.subjects.layout import GRID, box_to_mask, cell_ious

LAMBDA = 0.05
SIZE = 1024
SCENE = {  # normalised xyxy: a dog lying bottom-left, a standing person, a cup on a shelf
    "dog": (0.05, 0.45, 0.55, 0.95), "person": (0.55, 0.10, 0.80, 0.95), "cup": (0.84, 0.62, 0.94, 0.74),
}


def ellipse(box, size: int = SIZE) -> np.ndarray:
    x0, y0, x1, y1 = (v * size for v in box)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    return ((xs - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + ((ys - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 <= 1


def readings(ious: np.ndarray, lam: float = LAMBDA) -> dict[str, np.ndarray]:
    """tau per subject (n,) under each reading."""
    positive = ious[ious > 0]
    return {"overlapping pairs": np.full(len(ious), lam * positive.mean()), "all pairs": np.full(len(ious), lam * ious.mean()),
            "per subject": lam * ious.mean(axis=1)}


def cells_over(masks: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, list[int]], np.ndarray]:
    ious = cell_ious(masks, GRID)
    taus = readings(ious)
    return taus, {r: [int((row > t).sum()) for row, t in zip(ious, tau)] for r, tau in taus.items()}, ious


def report(title: str, names: list[str], masks: np.ndarray) -> None:
    taus, cells, ious = cells_over(masks)
    print(f"\n{title}: {', '.join(f'{n} {100 * m.mean():.1f}%' for n, m in zip(names, masks))} of the image; "
          f"overlapping cells {', '.join(f'{n} {int((row > 0).sum())}' for n, row in zip(names, ious))}")
    for reading, tau in taus.items():
        shown = ", ".join(f"{t:.5f}" for t in tau) if reading == "per subject" else f"{tau[0]:.5f}"
        print(f"  {reading:18s} tau {shown:26s} cells over tau: {', '.join(f'{n} {c}' for n, c in zip(names, cells[reading]))}")


def random_placements(count: int = 300, seed: int = 0) -> None:
    """The scene's three subjects (box and ellipse shapes) at random positions: how often the
    readings label a different number of cells, and the cells each labels on average."""
    rng = np.random.default_rng(seed)
    for shape in ("boxes", "ellipses"):
        totals = {r: np.zeros(3) for r in ("overlapping pairs", "all pairs", "per subject")}
        differ, ratios = 0, []
        for _ in range(count):
            boxes = []
            for x0, y0, x1, y1 in SCENE.values():
                w, h = x1 - x0, y1 - y0
                left, top = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
                boxes.append((left, top, left + w, top + h))
            masks = np.stack([box_to_mask(np.asarray(b), SIZE, SIZE) if shape == "boxes" else ellipse(b) for b in boxes])
            taus, cells, _ = cells_over(masks)
            for reading, counts in cells.items():
                totals[reading] += counts
            differ += len({tuple(c) for c in cells.values()}) > 1
            ratios.append(taus["overlapping pairs"][0] / taus["all pairs"][0])
        print(f"\n{count} random placements, {shape}: tau(overlapping) / tau(all) {np.mean(ratios):.1f}x on average; "
              f"the readings label different cells in {100 * differ / count:.0f}% of scenes; mean cells per subject:")
        for reading, total in totals.items():
            print(f"  {reading:18s} {', '.join(f'{n} {t / count:.2f}' for n, t in zip(SCENE, total))}")


if __name__ == "__main__":
    names, boxes = list(SCENE), list(SCENE.values())
    report("hand-made scene, boxes", names, np.stack([box_to_mask(np.asarray(b), SIZE, SIZE) for b in boxes]))
    report("hand-made scene, ellipses", names, np.stack([ellipse(b) for b in boxes]))
    random_placements()
    if len(sys.argv) > 1:
        import pyarrow.parquet as pq

        files = sorted((Path(sys.argv[1]) / "data").glob("*.parquet"))
        rows = [r for f in files for r in pq.read_table(f, columns=["id", "categories", "boxes"]).to_pylist()]
        row = max(rows, key=lambda r: (len(r["boxes"]), r["id"]))
        report(f"published sample {row['id']}, boxes", row["categories"],
               np.stack([box_to_mask(np.asarray(b, float), SIZE, SIZE) for b in row["boxes"]]))
