"""Tiny FLUX.1 pipelines for the zoo: FluxPipeline (t2i) and FluxKontextPipeline (editor).

The geometry is FLUX's own: a 16-channel latent at 8x spatial downsampling, packed 2x2 into the
64 transformer input channels, FLUX's VAE scaling/shift factors, a CLIP text encoder for the pooled
embedding (77 tokens), a T5 encoder for the sequence embedding (up to 512 tokens) and FLUX's
flow-matching scheduler with dynamic shifting. Only widths and depths shrink.
"""
from __future__ import annotations

from pathlib import Path

# FLUX.1-dev / Kontext-dev values that the pipelines read at run time.
_FLUX_LATENT_CHANNELS = 16
_FLUX_VAE_SCALING = 0.3611
_FLUX_VAE_SHIFT = 0.1159
_FLUX_CLIP_MAX_LENGTH = 77
_FLUX_T5_MAX_LENGTH = 512
_FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
_TEXT_WIDTH = 32  # CLIP hidden size = pooled projection dim; T5 d_model = joint attention dim


def _flux_components() -> dict:
    """Tiny randomly initialised FLUX components, keyed as both pipeline constructors take them."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    from music_model.zoo.tokenizers import clip_bpe, unigram_pieces

    vocab, merges = clip_bpe()
    clip_tokenizer = CLIPTokenizer(
        vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=_FLUX_CLIP_MAX_LENGTH
    )
    t5_tokenizer = T5Tokenizer(vocab=unigram_pieces(), extra_ids=0, model_max_length=_FLUX_T5_MAX_LENGTH)

    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=_TEXT_WIDTH,
            intermediate_size=2 * _TEXT_WIDTH,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=clip_tokenizer.model_max_length,
            projection_dim=_TEXT_WIDTH,
            hidden_act="quick_gelu",
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=_TEXT_WIDTH,
            d_kv=16,
            d_ff=2 * _TEXT_WIDTH,
            num_layers=1,
            num_heads=2,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as in FLUX
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
        )
    )
    # Four resolution levels = three 2x downsamplings = FLUX's 8x latent.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=_FLUX_LATENT_CHANNELS,
        sample_size=1024,
        scaling_factor=_FLUX_VAE_SCALING,
        shift_factor=_FLUX_VAE_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
        mid_block_add_attention=True,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * _FLUX_LATENT_CHANNELS,  # the pipeline packs 2x2 latent patches into channels
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_WIDTH,
        pooled_projection_dim=_TEXT_WIDTH,
        guidance_embeds=True,  # dev and Kontext-dev are guidance-distilled
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, split like FLUX's (16, 56, 56)
    )
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**_FLUX_SCHEDULER),
        vae=vae.eval(),
        text_encoder=clip.eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=t5.eval(),
        tokenizer_2=t5_tokenizer,
        transformer=transformer.eval(),
    )


def build_flux(out_dir: Path, seed: int) -> None:
    """A tiny FLUX.1-dev-shaped FluxPipeline folder."""
    from diffusers import FluxPipeline

    FluxPipeline(**_flux_components()).save_pretrained(out_dir, safe_serialization=True)


def build_flux_kontext(out_dir: Path, seed: int) -> None:
    """A tiny FLUX.1-Kontext-dev-shaped FluxKontextPipeline folder."""
    from diffusers import FluxKontextPipeline

    FluxKontextPipeline(**_flux_components()).save_pretrained(out_dir, safe_serialization=True)
