"""DINO, CLIP-I and CLIP-T as the field measures them, computed in batches, with bootstrap intervals.

Every image is decoded once and embedded once per model, in batches of the role's `batch_size`;
pair scores are then read off a cosine matrix of the unit embeddings, so scoring G generated images
against R references costs G + R forward passes, not 2 x G x R. Preprocessing is the roles' own
hand-written protocol (`music_model.media.preprocess`): DINO Resize 256 bicubic -> CenterCrop 224 ->
ImageNet normalisation; CLIP Resize 224 bicubic -> CenterCrop 224 -> CLIP normalisation.

Scores are raw cosines of L2-normalised embeddings, in [-1, 1]: not multiplied by 100, not clipped
or rescaled as CLIPScore does. `SCALE` says so in every output.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_specs.eval import CLIP_I, CLIP_T, DINO
from data_specs.roles import RoleSpec

SCALE = "raw cosine similarity of L2-normalised embeddings, in [-1, 1] (not x100, not rescaled)"
PROTOCOL = {
    DINO.name: "dino role CLS embedding; Resize 256 bicubic -> CenterCrop 224 -> ImageNet normalisation",
    CLIP_I.name: "clip role image embedding; Resize 224 bicubic -> CenterCrop 224 -> CLIP normalisation",
    CLIP_T.name: "clip role image embedding against the text embedding of the prompt (class noun, no rare token)",
}


class UnreadableImage(ValueError):
    """An input that is not a decodable image; `reason` is the drop reason recorded for it."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(source: str | Path | bytes, name: str = "") -> Image.Image:
    """A fully decoded RGB image from a path or encoded bytes. A missing, empty, truncated, corrupt
    or non-image input raises `UnreadableImage` (truncated images are never padded with grey)."""
    label = name or (str(source) if not isinstance(source, bytes) else "image bytes")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise UnreadableImage("missing_file", f"{label}: no such file")
        data = path.read_bytes()
    else:
        data = source
    if not data:
        raise UnreadableImage("unreadable_image", f"{label}: empty file")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes every pixel: a truncated file fails here, not inside a model batch
        return image if image.mode == "RGB" else image.convert("RGB")
    except UnidentifiedImageError:
        raise UnreadableImage("unreadable_image", f"{label}: not an image PIL can identify") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # PIL's truncation and corruption errors
        raise UnreadableImage("unreadable_image", f"{label}: {error}") from None


@dataclass
class ImageEmbeddings:
    """Unit float32 embeddings of the same images, row i = image i, one matrix per model."""

    dino: np.ndarray
    clip: np.ndarray

    def take(self, rows: Sequence[int] | slice) -> "ImageEmbeddings":
        index = rows if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        return ImageEmbeddings(self.dino[index], self.clip[index])


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) cosines of unit rows, accumulated in float64."""
    return a.astype(np.float64) @ b.astype(np.float64).T


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of row i of `a` with row i of `b` (unit rows), in float64."""
    return np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))


class Scorer:
    """DINO + CLIP (image and text) over already-loaded roles; `select` is the optional Pass@N
    text-image selector (the paper's CLIP ViT-L/14). Model calls hold the role's lock, so shards
    running in threads take turns on a shared model."""

    def __init__(self, dino, clip, select=None):
        self.dino, self.clip, self.select = dino, clip, select

    @classmethod
    def from_specs(cls, dino: RoleSpec | dict, clip: RoleSpec | dict, select: RoleSpec | dict | None = None) -> "Scorer":
        from music_model.roles import load_role

        return cls(load_role(dino), load_role(clip), load_role(select) if select is not None else None)

    def embed_images(self, images: Sequence[Image.Image]) -> ImageEmbeddings:
        images = list(images)
        with self.dino.lock:
            dino = self.dino.embed_images(images)
        with self.clip.lock:
            clip = self.clip.embed_images(images)
        return ImageEmbeddings(dino, clip)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        with self.clip.lock:
            return self.clip.embed_texts(list(texts))

    def selection_scores(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """The selector's text-image cosine of image i with text i (each distinct text embedded once)."""
        if self.select is None:
            raise ValueError("no selection model: the spec's roles.clip_select is needed for Pass@N")
        unique = list(dict.fromkeys(texts))
        with self.select.lock:
            image_rows = self.select.embed_images(list(images))
            text_rows = self.select.embed_texts(unique)
        where = {text: i for i, text in enumerate(unique)}
        return rowwise_cosine(image_rows, text_rows[[where[t] for t in texts]])


def pair_means(generated: np.ndarray, references: np.ndarray) -> np.ndarray:
    """For each generated row, the mean cosine over every reference row: the DreamBench
    per-image DINO / CLIP-I (every generated x real pair of a subject)."""
    return cosine_matrix(generated, references).mean(axis=1)


# --- bootstrap -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    mean: float
    ci_low: float
    ci_high: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}


def bootstrap_estimate(
    values: Sequence[float],
    groups: Sequence[Any] | None = None,
    *,
    equal_group_weight: bool = False,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """The mean and its percentile-bootstrap interval. With `groups`, resampling is stratified
    (units are redrawn within their group, so the benchmark's composition stays fixed) and, with
    `equal_group_weight`, the statistic is the mean of group means (DreamBench: average per
    subject, then over subjects). NaN values (e.g. a score that does not exist) are left out."""
    values = np.asarray(values, dtype=np.float64)
    keys = np.zeros(len(values), dtype=np.int64) if groups is None else np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1]
    if len(keys) != len(values):
        raise ValueError(f"bootstrap: {len(values)} values but {len(keys)} group labels")
    present = ~np.isnan(values)
    values, keys = values[present], keys[present]
    if len(values) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    group_means, point, weights = [], [], []
    for key in np.unique(keys):
        members = values[keys == key]
        draws = members[rng.integers(0, len(members), size=(samples, len(members)))]
        group_means.append(draws.mean(axis=1))
        point.append(members.mean())
        weights.append(1.0 if equal_group_weight else float(len(members)))
    weights_arr = np.asarray(weights) / np.sum(weights)
    # The point estimate is row 0 of the resampled statistics' own product: computed apart (np.dot
    # against a matrix product), it can differ in the last bit and fall outside an interval whose
    # draws are all equal (one value per group).
    statistic = np.vstack([point, np.stack(group_means, axis=1)]) @ weights_arr
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(statistic[1:], [tail, 100 - tail])
    return Estimate(float(statistic[0]), float(low), float(high), int(len(values)))
