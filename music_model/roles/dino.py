"""The `dino` role: images to L2-normalised DINO CLS embeddings (DreamBench's DINO score).

A ViT checkpoint (facebook/dino-vits16, loaded without its pooler) or any AutoModel vision
backbone with a CLS token and a final layernorm (DINOv2). Preprocessing is the evaluation
protocol's `dino_transform` (Resize 256 bicubic -> CenterCrop 224 -> ImageNet normalisation), not
the checkpoint's own processor, which squashes without a crop.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from data_specs.roles import RoleSpec
from music_model.media.preprocess import dino_transform
from music_model.roles.base import check_options
from music_model.roles.clip import ImageEmbeddingRole


class TransformersDino(ImageEmbeddingRole):
    """Crop size is the config's `image_size`; `options: {image_size: 224}` overrides it (DINOv2
    configs say 518, while its DreamBench-style use is 224)."""

    def __init__(self, spec: RoleSpec):
        super().__init__(spec)
        check_options(spec, ("image_size",))
        from transformers import AutoConfig, AutoModel, ViTModel

        config = AutoConfig.from_pretrained(self.path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
        if config.model_type == "vit":  # the embedding is the CLS token, the pooler is not used
            self.model = self.load_pretrained(ViTModel, add_pooling_layer=False)
        else:
            self.model = self.load_pretrained(AutoModel, trust_remote_code=spec.trust_remote_code)
        self.embed_dim = config.hidden_size
        self.image_size = int(spec.options.get("image_size", config.image_size))
        # ViT needs to be told to interpolate position embeddings off its native size; DINOv2 always does
        self._forward_kwargs = (
            {"interpolate_pos_encoding": True}
            if config.model_type == "vit" and self.image_size != config.image_size
            else {}
        )

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return dino_transform(images, self.image_size)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        # last_hidden_state is already through the final layernorm; position 0 is CLS
        return self.model(pixel_values=pixels, **self._forward_kwargs).last_hidden_state[:, 0]
