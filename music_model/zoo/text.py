"""Tiny Qwen3 (llm) and Qwen2.5-VL (vlm) checkpoints in their real formats.

Width and depth shrink; the tokenizer class, pre-tokenizer, ChatML special tokens, chat templates,
image processor defaults (patch 14, merge 2, temporal patch 2, CLIP normalisation, pixel bounds)
and vision token plumbing are the real ones, so the roles exercise the same code paths as with
the released checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import torch

from music_model.zoo.tokenizers import byte_level_bpe, words

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VISION_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# ChatML as Qwen3 writes it (without the thinking block, which the tiny model has no use for).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen2.5-VL's template: content is a string or a list of {type: text|image|video} items; each
# image item becomes <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to
# one pad per merged patch.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen2.5-VL's released preprocessor bounds (pixels of the resized image).
QWEN2_5_VL_MIN_PIXELS = 56 * 56
QWEN2_5_VL_MAX_PIXELS = 28 * 28 * 16384


def qwen_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab in Qwen's shape. Qwen's pre-tokenizer splits ` word` with its leading
    space (`[^\\r\\n\\p{L}\\p{N}]?\\p{L}+`) and byte-maps it without adding a prefix space, so
    besides `word` (text start) the vocabulary holds `Ġword` (mid-sentence), merged last from
    `Ġ` + `word` so that the word's own merges still apply first."""
    vocab, merges = byte_level_bpe(prefix_space=False)
    vocab = dict(vocab)
    space = "Ġ"  # byte-level BPE's printable stand-in for the space byte
    pairs = [tuple(m.split(" ")) for m in merges]
    for word in words():
        if word in vocab and space + word not in vocab:
            vocab[space + word] = len(vocab)
            pairs.append((space, word))
    return vocab, pairs


def qwen_tokenizer(extra_specials: list[str], chat_template: str):
    """A Qwen2Tokenizer with ChatML specials; eos <|im_end|> and pad <|endoftext|> as in Qwen's
    instruct checkpoints."""
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocab()
    specials = CHAT_SPECIALS + extra_specials
    # Specials follow the BPE tokens in Qwen's order (<|endoftext|>, <|im_start|>, <|im_end|>, ...).
    vocab.update({token: len(vocab) + i for i, token in enumerate(specials)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=specials,
        model_max_length=32768,
    )
    tokenizer.chat_template = chat_template
    missing = [t for t in specials if tokenizer.convert_tokens_to_ids(t) != vocab[t]]
    if missing:
        raise RuntimeError(f"zoo tokenizer lost special tokens {missing}")
    return tokenizer


def _generation_config(tokenizer):
    from transformers import GenerationConfig

    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )


def _tiny_text_kwargs(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )


def _save(model, tokenizer_or_processor, out_dir: Path) -> None:
    # bfloat16 as the released checkpoints ship; roles cast to the spec's dtype on load.
    model.to(torch.bfloat16).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer_or_processor.save_pretrained(out_dir)


def build_qwen3(out_dir: Path, seed: int) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer([], QWEN3_CHAT_TEMPLATE)
    config = Qwen3Config(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, **_tiny_text_kwargs(tokenizer))
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = _generation_config(tokenizer)
    _save(model, tokenizer, out_dir)


def build_qwen2_5_vl(out_dir: Path, seed: int) -> None:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = qwen_tokenizer(VISION_SPECIALS, QWEN2_5_VL_CHAT_TEMPLATE)
    token_id = tokenizer.convert_tokens_to_ids
    text = _tiny_text_kwargs(tokenizer)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # mrope splits the rotary half-dimension over (time, height, width): the sections sum to head_dim / 2.
    mrope_section = [2, 3, 3]
    assert sum(mrope_section) == head_dim // 2
    config = Qwen2_5_VLConfig(
        text_config=dict(
            text,
            rope_parameters={"rope_type": "default", "mrope_section": mrope_section, "rope_theta": 1_000_000.0},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=text["hidden_size"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = _generation_config(tokenizer)
    size = {"shortest_edge": QWEN2_5_VL_MIN_PIXELS, "longest_edge": QWEN2_5_VL_MAX_PIXELS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2),
        video_processor=Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2),
        tokenizer=tokenizer,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    _save(model, processor, out_dir)
