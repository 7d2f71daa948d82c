"""Tiny zoo entries for the detector and segmenter roles: GroundingDINO, SAM2, SAM (transformers)
and SAM in segment-anything's own checkpoint format.

Each keeps its real model's input side (GroundingDINO's 800/1333 resize with a BERT tokenizer and
256-token text budget; SAM and SAM2 at 1024 px with patch 16 and their real processors) and shrinks
only width and depth.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# A segment-anything folder, the tiny zoo's form of an official checkpoint: the builder arguments
# of `build_official_sam` and the state dict in the official format (the segmenter role reads it).
SAM_CONFIG_FILE = "sam_config.json"
SAM_WEIGHTS_FILE = "sam.pth"

# Mask decoder and prompt encoder width shared by the three SAM-family entries.
_SAM_WIDTH = 32
_TINY_MASK_DECODER = dict(hidden_size=_SAM_WIDTH, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)

# SAM's ViT attends globally over all 64x64 patches in a few blocks; in a 2-block tiny model one
# such block is ~90% of the compute, so the tiny SAM encoders use windowed (14x14) attention only.
_SAM_GLOBAL_ATTENTION: list[int] = []

# segment-anything's builder arguments (see `build_official_sam`) for a ViT image encoder at
# 1024 px, patch 16.
SAM_OFFICIAL_TINY = {
    "image_size": 1024,
    "vit_patch_size": 16,
    "encoder_embed_dim": 32,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": _SAM_GLOBAL_ATTENTION,
    "prompt_embed_dim": _SAM_WIDTH,
    "decoder_depth": 2,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
}


def build_grounding_dino(out_dir: Path, seed: int) -> None:
    """A tiny GroundingDinoForObjectDetection (Swin + BERT) with the real GroundingDinoProcessor."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    from music_model.zoo.tokenizers import write_bert_vocab

    write_bert_vocab(out_dir / "vocab.txt")
    tokenizer = BertTokenizer(vocab=str(out_dir / "vocab.txt"))
    backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 2], out_indices=[2, 3, 4])
    text = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,  # the deformable attention kernels want a multiple of 32
        encoder_layers=1,
        decoder_layers=2,  # the two-stage head needs at least two decoder layers
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=30,
    )
    GroundingDinoForObjectDetection(config).eval().save_pretrained(out_dir)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=tokenizer).save_pretrained(out_dir)


def build_sam2(out_dir: Path, seed: int) -> None:
    """A tiny Sam2Model (4-stage Hiera, FPN) with the real Sam2Processor at 1024 px."""
    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2ImageProcessor,
        Sam2Model,
        Sam2Processor,
        Sam2VisionConfig,
    )

    hiera = Sam2HieraDetConfig(
        hidden_size=8,
        num_attention_heads=1,
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        global_attention_blocks=[3],  # not a stage's first block: Hiera pools queries there and needs a window
    )
    vision = Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=[64, 32, 16, 8], fpn_hidden_size=_SAM_WIDTH)
    config = Sam2Config(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=_SAM_WIDTH),
        mask_decoder_config=_TINY_MASK_DECODER,
    )
    Sam2Model(config).eval().save_pretrained(out_dir)
    Sam2Processor(image_processor=Sam2ImageProcessor()).save_pretrained(out_dir)


def build_sam(out_dir: Path, seed: int) -> None:
    """A tiny SamModel (ViT at 1024 px, patch 16) with the real SamProcessor."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    config = SamConfig(
        vision_config=dict(
            hidden_size=32,
            output_channels=_SAM_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            global_attn_indexes=_SAM_GLOBAL_ATTENTION,
            num_pos_feats=_SAM_WIDTH // 2,
        ),
        prompt_encoder_config=dict(hidden_size=_SAM_WIDTH),
        mask_decoder_config=_TINY_MASK_DECODER,
    )
    SamModel(config).eval().save_pretrained(out_dir)
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(out_dir)


def build_sam_official(out_dir: Path, seed: int) -> None:
    """A tiny segment-anything `Sam` as its official checkpoints ship (a `.pth` state dict), plus
    the JSON of builder arguments that the segmenter rebuilds the architecture from."""
    import torch


    model = build_official_sam(SAM_OFFICIAL_TINY)
    torch.save(model.state_dict(), out_dir / SAM_WEIGHTS_FILE)
    (out_dir / SAM_CONFIG_FILE).write_text(json.dumps(SAM_OFFICIAL_TINY, indent=1, sort_keys=True) + "\n")


def build_official_sam(config: dict[str, Any]):
    """A segment-anything `Sam` from builder arguments: the ones its `_build_sam` fixes for the
    official ViT-H/L/B (1024 px, patch 16, 256-wide prompts, 2-layer decoder) made explicit, so a
    smaller architecture can be described in a JSON file."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    image_size, patch, width = config["image_size"], config["vit_patch_size"], config["prompt_embed_dim"]
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=config["encoder_depth"],
            embed_dim=config["encoder_embed_dim"],
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=config["encoder_num_heads"],
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=config["encoder_global_attn_indexes"],
            window_size=14,
            out_chans=width,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=width,
            image_embedding_size=(image_size // patch, image_size // patch),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=config["decoder_depth"],
                embedding_dim=width,
                mlp_dim=config["decoder_mlp_dim"],
                num_heads=config["decoder_num_heads"],
            ),
            transformer_dim=width,
            iou_head_depth=3,
            iou_head_hidden_dim=config["iou_head_hidden_dim"],
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()
