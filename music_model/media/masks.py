"""Masks as COCO run-length encodings (pycocotools), the on-disk form of every mask."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask


def encode(mask: np.ndarray) -> dict:
    """bool (H, W) -> {"size": [H, W], "counts": str}."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict) -> np.ndarray:
    """Inverse of `encode`: a bool (H, W) array."""
    return coco_mask.decode({"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}).astype(bool)


def area(rle: dict) -> int:
    return int(coco_mask.area({"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}))
