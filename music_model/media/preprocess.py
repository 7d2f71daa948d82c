"""Image preprocessing of the DreamBench evaluation protocol, written out by hand.

The field scores DreamBench with torchvision's `Resize(short side, BICUBIC) -> CenterCrop ->
ToTensor -> Normalize` on PIL images. Hugging Face's ViT processor instead squashes to 224x224
without a crop, which gives different DINO scores, so the roles use these
functions. They reproduce torchvision's composition exactly: PIL resampling with torchvision's
output-size and crop-offset rounding, then float32 scaling and normalisation.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# DINO evaluation resizes to 256 before a 224 crop (the ImageNet 0.875 crop ratio).
DINO_CROP_RATIO = 224 / 256


def as_rgb(image: Image.Image, index: int = 0) -> Image.Image:
    """`image` in RGB (grayscale, RGBA and palette images are converted)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image {index}: expected a PIL.Image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Resize so the shorter side is `size`, the longer side truncated as torchvision does."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image if new_size == image.size else image.resize(new_size, resample)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """The central `size` x `size` window of an (h, w, c) array, offsets rounded as torchvision
    rounds them (Python's round-half-to-even)."""
    height, width = pixels.shape[:2]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from a {width}x{height} image")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return pixels[top : top + size, left : left + size]


def resize_crop_normalise(
    images: Sequence[Image.Image],
    resize_to: int,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> torch.Tensor:
    """(n, 3, crop, crop) float32: shorter side to `resize_to`, centre crop, [0, 1], normalised."""
    if crop > resize_to:
        raise ValueError(f"crop size {crop} is larger than the resize target {resize_to}")
    if not images:
        return torch.empty((0, 3, crop, crop), dtype=torch.float32)
    # Resampling is per image (PIL); scaling and normalisation run once on the stacked batch.
    crops = [
        center_crop(np.asarray(resize_shorter_side(as_rgb(image, i), resize_to, resample)), crop)
        for i, image in enumerate(images)
    ]
    pixels = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.sub(mean_t).div(std_t).contiguous()


def dino_transform(images: Sequence[Image.Image], size: int = 224) -> torch.Tensor:
    """DreamBench DINO preprocessing: Resize(256, bicubic) -> CenterCrop(224) -> ImageNet norm.
    Another `size` keeps the 224/256 crop ratio."""
    return resize_crop_normalise(images, round(size / DINO_CROP_RATIO), size, IMAGENET_MEAN, IMAGENET_STD)


def clip_transform(
    images: Sequence[Image.Image],
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> torch.Tensor:
    """CLIP preprocessing: Resize(size, bicubic) -> CenterCrop(size) -> CLIP normalisation."""
    return resize_crop_normalise(images, size, size, mean, std, resample)
