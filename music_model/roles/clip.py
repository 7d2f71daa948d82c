"""The `clip` role: images and texts to L2-normalised embeddings in one shared space.

Two backends: transformers `CLIPModel` checkpoints and open_clip checkpoints (hub `hf-hub:` repos,
built-in architectures with a pretrained tag, or a local folder in open_clip's own format). Both
preprocess with `clip_transform` (the evaluation protocol's Resize -> CenterCrop, at the size,
mean and std the checkpoint declares), so the two backends score the same images the same way.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_specs.roles import RoleSpec, SpecError, model_kind
from music_model.media.preprocess import clip_transform
from music_model.roles.base import Role, check_options

# open_clip names its interpolation modes; its transforms map anything but bilinear to bicubic.
_OPEN_CLIP_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_OPEN_CLIP_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def unit_rows(chunks: list[torch.Tensor], dim: int) -> np.ndarray:
    """Concatenated chunk embeddings as float32 numpy rows of unit L2 norm."""
    if not chunks:
        return np.empty((0, dim), dtype=np.float32)
    features = torch.cat([chunk.float() for chunk in chunks])
    return F.normalize(features, dim=-1).cpu().numpy()


class ImageEmbeddingRole(Role):
    """Batched image embedding shared by the clip and dino roles: a subclass sets `embed_dim` and
    turns a chunk of PIL images into pixels (`_pixels`) and pixels into features (`_encode_pixels`)."""

    embed_dim: int

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, embed_dim) float32, each row L2-normalised."""
        images = list(images)
        with torch.inference_mode():
            chunks = self.run_batched(len(images), lambda batch: [
                self._encode_pixels(self._pixels(images[batch.start : batch.stop]).to(self.device, self.dtype))])
        return unit_rows(chunks, self.embed_dim)


class ClipRole(ImageEmbeddingRole):
    """Adds batched text embedding; a subclass encodes a chunk of strings (`_encode_texts`)."""

    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    resample: Image.Resampling = Image.Resampling.BICUBIC

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return clip_transform(images, self.image_size, self.image_mean, self.image_std, self.resample)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, embed_dim) float32, each row L2-normalised; texts past the context are truncated."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i}: expected a str, got {type(text).__name__}")
        with torch.inference_mode():
            chunks = self.run_batched(len(texts), lambda batch: [self._encode_texts(texts[batch.start : batch.stop])])
        return unit_rows(chunks, self.embed_dim)


class TransformersClip(ClipRole):
    """A transformers `CLIPModel` checkpoint with its tokenizer; image size from the vision config,
    mean, std and resampling from the checkpoint's image processor config."""

    def __init__(self, spec: RoleSpec):
        super().__init__(spec)
        check_options(spec, ())
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model = self.load_pretrained(CLIPModel)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
        processor = AutoImageProcessor.from_pretrained(self.path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
        config = self.model.config
        self.embed_dim = config.projection_dim
        self.image_size = config.vision_config.image_size
        self.image_mean = tuple(processor.image_mean)
        self.image_std = tuple(processor.image_std)
        self.resample = Image.Resampling(int(processor.resample))
        self.context_length = config.text_config.max_position_embeddings

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        # transformers 5 returns an output object; the projected embedding is its pooler_output.
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        ).to(self.device)
        return self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output


def open_clip_name(spec: RoleSpec, path: str) -> str:
    """open_clip's model identifier: `local-dir:<folder>` for a local or zoo folder, the spec's
    own string (`hf-hub:org/repo` or a built-in architecture name) otherwise."""
    return f"local-dir:{path}" if model_kind(spec.model) in ("zoo", "local") else path


class OpenClipClip(ClipRole):
    """An open_clip checkpoint through open_clip's own loader and tokenizer. `model` is
    `hf-hub:org/repo`, a local folder with `open_clip_config.json` + weights, or a built-in
    architecture (`ViT-B-32`) with `options: {pretrained: <tag or weights file>}`."""

    def __init__(self, spec: RoleSpec):
        super().__init__(spec)
        check_options(spec, ("pretrained",))
        if spec.revision is not None:  # open_clip's hub loader takes a repo name, never a revision
            raise SpecError(f"revision: the open_clip backend cannot load a revision of {spec.model}; use a local copy of it")
        import open_clip

        name = open_clip_name(spec, self.path)
        self.model = open_clip.create_model(
            name,
            pretrained=spec.options.get("pretrained"),
            precision=_OPEN_CLIP_PRECISION[self.dtype],
            device=self.device,
            require_pretrained=True,  # never score with randomly initialised weights by accident
        ).eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self._configure_preprocessing(self.model.visual.preprocess_cfg)
        # built-in names may be written `ViT-B/32`; open_clip's registry spells them `ViT-B-32`
        self.embed_dim = open_clip.get_model_config(name if ":" in name else name.replace("/", "-"))["embed_dim"]

    def _configure_preprocessing(self, cfg: dict) -> None:
        size = cfg["size"]
        height, width = (size, size) if isinstance(size, int) else size
        if height != width:
            raise ValueError(f"open_clip model {self.spec.model}: non-square input {height}x{width} is not supported")
        if cfg.get("resize_mode", "shortest") != "shortest":
            raise ValueError(
                f"open_clip model {self.spec.model}: resize_mode {cfg['resize_mode']!r} is not supported "
                "(the evaluation protocol resizes the shortest side, then centre-crops)"
            )
        self.image_size = height
        self.image_mean = tuple(cfg["mean"])
        self.image_std = tuple(cfg["std"])
        self.resample = _OPEN_CLIP_RESAMPLE.get(cfg.get("interpolation", "bicubic"), Image.Resampling.BICUBIC)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))
