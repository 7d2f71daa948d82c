"""Tiny zoo entries for the embedding roles: CLIP (transformers and open_clip formats) and DINO.

They keep the real models' input side (224 px, patch 32 / 14 / 16, the real processors and
open_clip's bundled tokenizer) and shrink only width and depth.
"""
from __future__ import annotations

import json
from pathlib import Path

# Every tiny transformer tower (CLIP vision and text, DINO) has this width and depth.
_TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

# open_clip's own on-disk format (`open_clip_config.json` + `open_clip_model.safetensors`), as the
# hf-hub checkpoints ship it. The text tower keeps CLIP's 49408-token BPE, so its width stays
# small to keep the embedding table (49408 x width floats) near 3 MB.
_OPEN_CLIP_B32 = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 32, "head_width": 16, "layers": 2},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def _build_transformers_clip(out_dir: Path, patch_size: int) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from music_model.zoo.tokenizers import write_clip_tokenizer

    write_clip_tokenizer(out_dir)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir)
    config = CLIPConfig(
        projection_dim=32,
        vision_config=dict(_TINY_TOWER, projection_dim=32, image_size=224, patch_size=patch_size),
        text_config=dict(
            _TINY_TOWER,
            projection_dim=32,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
    )
    CLIPModel(config).eval().save_pretrained(out_dir)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(out_dir)


def build_clip_b32(out_dir: Path, seed: int) -> None:
    """A tiny CLIPModel shaped like ViT-B/32 at its input (224 px, patch 32) + CLIPProcessor."""
    _build_transformers_clip(out_dir, patch_size=32)


def build_clip_l14(out_dir: Path, seed: int) -> None:
    """A tiny CLIPModel shaped like ViT-L/14 at its input (224 px, patch 14), for Pass@N selection."""
    _build_transformers_clip(out_dir, patch_size=14)


def build_open_clip_b32(out_dir: Path, seed: int) -> None:
    """A tiny open_clip ViT-B/32-style model in open_clip's hub format; the role reads it back
    with open_clip's own `local-dir:` loader."""
    import open_clip
    from safetensors.torch import save_file

    (out_dir / "open_clip_config.json").write_text(json.dumps(_OPEN_CLIP_B32, indent=2) + "\n")
    model = open_clip.CLIP(**_OPEN_CLIP_B32["model_cfg"])  # the class open_clip builds for this config
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, out_dir / "open_clip_model.safetensors")


def build_dino_vits16(out_dir: Path, seed: int) -> None:
    """A tiny ViTModel shaped like facebook/dino-vits16 at its input (224 px, patch 16, no pooler)
    + the ViTImageProcessor that checkpoint ships (ImageNet mean/std)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(image_size=224, patch_size=16, **_TINY_TOWER)
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(out_dir)
    ViTImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out_dir)
