"""The `segmenter` role: images and boxes to one boolean mask per box, at each image's own size.

Two backends behind one interface (`segment`): transformers SAM2 / SAM checkpoints, and the
official segment-anything package for Meta's `.pth` checkpoints. Both take box prompts with a
single mask output per box, the setting SAM's authors recommend for unambiguous box prompts.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_specs.roles import RoleSpec, SpecError
from music_model.roles.base import Role, check_options
from music_model.zoo.vision import SAM_CONFIG_FILE, SAM_WEIGHTS_FILE, build_official_sam

OFFICIAL_MODEL_TYPES = ("vit_h", "vit_l", "vit_b")
_TRANSFORMERS_MODEL_TYPES = ("sam", "sam2", "sam2_video")


def pixel_boxes(boxes: np.ndarray, size: tuple[int, int], where: str) -> np.ndarray:
    """Normalised xyxy boxes (n, 4) as float32 pixel xyxy for an image of PIL `size` (W, H)."""
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.size == 0:
        return np.zeros((0, 4), np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes must have shape (n, 4), got {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{where}: boxes hold NaN or infinite values")
    width, height = size
    return np.clip(boxes, 0.0, 1.0) * np.array([width, height, width, height], np.float32)


def empty_masks(image: Image.Image) -> np.ndarray:
    width, height = image.size
    return np.zeros((0, height, width), dtype=bool)


class BoxSegmenter(Role):
    """What both backends share: input checks, box conversion, and batching over the images that
    have boxes (an image without boxes costs no model time). Subclasses implement `_segment_batch`."""

    def segment(self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """For each image, its boxes (n, 4 normalised xyxy) -> bool masks (n, H, W) at the image's size."""
        if len(images) != len(boxes):
            raise ValueError(f"segment: got {len(images)} images but {len(boxes)} box arrays")
        images = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        pixels = [pixel_boxes(b, image.size, f"segment: image {i}") for i, (image, b) in enumerate(zip(images, boxes))]
        masks = [empty_masks(image) for image in images]
        with_boxes = [i for i, b in enumerate(pixels) if len(b)]

        def run_batch(batch: range) -> list[np.ndarray]:
            indices = [with_boxes[j] for j in batch]
            return self._segment_batch([images[i] for i in indices], [pixels[i] for i in indices])

        for i, image_masks in zip(with_boxes, self.run_batched(len(with_boxes), run_batch)):
            masks[i] = image_masks
        return masks

    def _segment_batch(self, images: list[Image.Image], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """Images (RGB) with at least one pixel-xyxy box each -> bool masks (n, H, W) per image."""
        raise NotImplementedError


class TransformersSegmenter(BoxSegmenter):
    """SAM2 (`Sam2Model`, including SAM 2.1 `sam2_video` checkpoints) or SAM (`SamModel`)."""

    def __init__(self, spec: RoleSpec):
        super().__init__(spec)
        check_options(spec, ())
        from transformers import AutoConfig, AutoModelForMaskGeneration, AutoProcessor

        remote = spec.trust_remote_code
        model_type = AutoConfig.from_pretrained(self.path, trust_remote_code=remote, revision=spec.revision).model_type
        if model_type not in _TRANSFORMERS_MODEL_TYPES:
            raise SpecError(
                f"model: {spec.model} is a {model_type!r} checkpoint; the transformers segmenter serves "
                f"{', '.join(_TRANSFORMERS_MODEL_TYPES)}"
            )
        # SAM resizes the longest side and pads, so its post-processing must crop the padding away
        self._crop_padding = model_type == "sam"
        self.processor = AutoProcessor.from_pretrained(self.path, trust_remote_code=remote, revision=spec.revision)
        self.model = self.load_pretrained(AutoModelForMaskGeneration, trust_remote_code=remote)
        if self.dtype != torch.float32:
            # Box corners are pixels at 1024, where bf16 steps by 4 px, and the prompt encoder casts
            # them to its own dtype before their sin/cos encoding. So boxes stay float32 and the
            # prompt encoder gets a float32 copy of that encoding (SAM ties it to the image-wide one,
            # which stays in the model's dtype); the mask decoder casts the box embeddings to its dtype.
            encoder = self.model.prompt_encoder
            encoder.shared_embedding = copy.deepcopy(encoder.shared_embedding).float()

    @torch.inference_mode()
    def _segment_batch(self, images: list[Image.Image], boxes: list[np.ndarray]) -> list[np.ndarray]:
        # The processor cannot pad box lists of unequal length: repeat each image's last box to the
        # longest list and drop the extra masks afterwards.
        longest = max(len(b) for b in boxes)
        padded = [np.concatenate([b, np.repeat(b[-1:], longest - len(b), axis=0)]).tolist() for b in boxes]
        inputs = self.processor(images=images, input_boxes=padded, return_tensors="pt")
        outputs = self.model(
            pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
            input_boxes=inputs["input_boxes"].to(self.device, torch.float32),  # exact corners: see __init__
            multimask_output=False,
        )
        sizes = [inputs["original_sizes"]]
        if self._crop_padding:
            sizes.append(inputs["reshaped_input_sizes"])
        masks = self.processor.post_process_masks(outputs.pred_masks.float().cpu(), *sizes, binarize=True)
        return [m[: len(b), 0].numpy().astype(bool) for m, b in zip(masks, boxes)]


class SegmentAnythingSegmenter(BoxSegmenter):
    """The official segment-anything package. `model` is an official `.pth` checkpoint (its
    architecture from `options.model_type`, else from a `vit_h` / `vit_l` / `vit_b` in the file
    name) or a folder holding `sam_config.json` + `sam.pth` (the zoo's format)."""

    def __init__(self, spec: RoleSpec):
        super().__init__(spec)
        check_options(spec, ("model_type",))
        from segment_anything.utils.transforms import ResizeLongestSide

        model, weights = self._build_model(Path(self.path), spec)
        # weights_only: an official checkpoint is a plain state dict, nothing to unpickle beyond tensors
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model = model.to(self.device).eval()
        if self.dtype != torch.float32:
            # segment-anything's prompt encoder casts box coordinates to float32 itself, so only the
            # image encoder (nearly all the compute) runs in the spec's dtype; the float32 decoder
            # takes its embeddings as they are
            self.model.image_encoder.to(self.dtype)
            self.model.image_encoder.register_forward_pre_hook(lambda _, args: tuple(a.to(self.dtype) for a in args))
        self.transform = ResizeLongestSide(self.model.image_encoder.img_size)

    @staticmethod
    def _build_model(path: Path, spec: RoleSpec):
        model_type = spec.options.get("model_type")
        if path.is_dir():
            config_path = path / SAM_CONFIG_FILE
            if not config_path.exists():
                raise SpecError(f"model: folder {path} has no {SAM_CONFIG_FILE}; give the official .pth file instead")
            return build_official_sam(json.loads(config_path.read_text())), path / SAM_WEIGHTS_FILE
        if not path.is_file():
            raise SpecError(f"model: segment_anything needs a local .pth file or folder, got {spec.model!r}")
        if model_type is None:
            named = [t for t in OFFICIAL_MODEL_TYPES if t in path.name]
            if len(named) != 1:
                raise SpecError(
                    f"options.model_type: needed for {path.name} (one of {', '.join(OFFICIAL_MODEL_TYPES)})"
                )
            model_type = named[0]
        if model_type not in OFFICIAL_MODEL_TYPES:
            raise SpecError(f"options.model_type: {model_type!r} is not one of {', '.join(OFFICIAL_MODEL_TYPES)}")
        from segment_anything import sam_model_registry

        return sam_model_registry[model_type](checkpoint=None), path

    @torch.inference_mode()
    def _segment_batch(self, images: list[Image.Image], boxes: list[np.ndarray]) -> list[np.ndarray]:
        # Sam's own batched forward: the images are encoded together, then each image's boxes are
        # decoded against its embedding and its masks scaled back to its original size.
        batched_input = []
        for image, image_boxes in zip(images, boxes):
            original_size = (image.height, image.width)
            resized = self.transform.apply_image(np.asarray(image))
            batched_input.append(
                {
                    "image": torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous(),
                    "original_size": original_size,
                    "boxes": torch.as_tensor(
                        self.transform.apply_boxes(image_boxes, original_size), device=self.device, dtype=torch.float32
                    ),
                }
            )
        outputs = self.model(batched_input, multimask_output=False)
        return [output["masks"][:, 0].cpu().numpy() for output in outputs]
