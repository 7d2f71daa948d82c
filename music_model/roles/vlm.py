"""The `vlm` role: images + prompts + pydantic schema -> validated objects, from a transformers
image-text-to-text model (default Qwen2.5-VL)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel

from data_specs.roles import RoleSpec
from music_model.roles.base import Role
from music_model.roles.structured import DecodeOptions, StructuredDecoder, StructuredResult


class TransformersVLM(Role):
    """A chat VLM with schema-constrained decoding; each sample has one or more images.

    Options: the llm role's decoding options with the same defaults (Qwen3's non-thinking
    recommendation: Qwen2.5-VL's model card gives none for sampling, and its generation_config is
    near-greedy with repetition_penalty 1.05, which leaves no retry a different answer), and
    `max_pixels`: the most pixels an image is resized to before patching, which bounds its tokens
    (Qwen-VL processors; default: the processor's own).

    `yes_probability` answers a yes/no question from one forward pass, without sampling;
    `frame_size` is the size the model sees an image at, the frame its pixel coordinates are in.
    """

    def __init__(self, spec: RoleSpec):
        super().__init__(spec)
        self.options = DecodeOptions.from_options(spec.options, other_keys=("max_pixels",))
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(
            self.path, trust_remote_code=spec.trust_remote_code, padding_side="left", revision=spec.revision
        )
        if not self.processor.chat_template:
            raise ValueError(f"model {spec.model}: the processor has no chat template; the vlm role needs a chat model")
        self.images_kwargs = self._images_kwargs(spec.options.get("max_pixels"))
        self.model = self.load_pretrained(AutoModelForImageTextToText)
        self.decoder = StructuredDecoder(self.model, self.processor.tokenizer)
        self.yes_ids = answer_token_ids(self.processor.tokenizer, "yes")
        self.no_ids = answer_token_ids(self.processor.tokenizer, "no")

    def _images_kwargs(self, max_pixels) -> dict:
        if max_pixels is None:
            return {}
        image_processor = self.processor.image_processor
        size = dict(image_processor.size)
        # Qwen-VL processors read size as a pixel-count range (shortest_edge = min_pixels,
        # longest_edge = max_pixels); other processors use those keys for edge lengths.
        if not (hasattr(image_processor, "merge_size") and "longest_edge" in size):
            raise ValueError(f"options.max_pixels: {type(image_processor).__name__} has no pixel budget to bound")
        if not (isinstance(max_pixels, int) and max_pixels >= size.get("shortest_edge", 1)):
            raise ValueError(f"options.max_pixels: must be an integer >= the processor's minimum {size.get('shortest_edge')}, got {max_pixels!r}")
        return {"images_kwargs": {"size": {**size, "longest_edge": max_pixels}}}

    def chat_text(self, n_images: int, prompt: str, system: str | None = None) -> str:
        """The chat-template text of one sample: its images first, then the prompt."""
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(
        self,
        images: Sequence[Sequence[Image.Image]],
        prompts: Sequence[str],
        schema: type[BaseModel],
        seeds: Sequence[int],
        system: str | None = None,
    ) -> list[StructuredResult]:
        """One `StructuredResult` per sample, in order; `images[i]` are sample i's images."""
        _check_samples(images, prompts)

        def encode(rows: Sequence[int]):
            return self.encode(images, prompts, rows, system)

        return self.decoder.generate(encode, len(prompts), schema, seeds, self.run_batched, self.options)

    def encode(self, images: Sequence[Sequence[Image.Image]], prompts: Sequence[str], rows: Sequence[int],
               system: str | None = None):
        """The model inputs of samples `rows`, left-padded; a ValueError for an image the processor rejects."""
        texts = [self.chat_text(len(images[i]), prompts[i], system) for i in rows]
        pixels = [[image.convert("RGB") for image in images[i]] for i in rows]
        batch = self.processor(text=texts, images=pixels, padding=True, return_tensors="pt", **self.images_kwargs)
        return batch.to(self.device)

    @torch.inference_mode()
    def yes_probability(self, images: Sequence[Sequence[Image.Image]], prompts: Sequence[str],
                        system: str | None = None) -> np.ndarray:
        """p(yes) / (p(yes) + p(no)) of each sample's first answer token, from one forward pass
        (no sampling, so no seed): each side sums the single-token spellings of its word ("Yes",
        " yes", ...). NaN for a sample whose image the processor rejects. Left padding under the
        attention mask keeps a row's value independent of its batch."""
        _check_samples(images, prompts)

        def run_batch(batch: range) -> list[float]:
            try:
                inputs = self.encode(images, prompts, batch, system)
            except ValueError:
                if len(batch) == 1:
                    return [float("nan")]
                return [p for i in batch for p in run_batch(range(i, i + 1))]
            return self._yes_probability(inputs)

        return np.array(self.run_batched(len(prompts), run_batch), dtype=np.float64)

    def _yes_probability(self, inputs) -> list[float]:
        logits = self.model(**inputs, logits_to_keep=1).logits[:, -1].float()
        # The softmax's normaliser cancels in the ratio: sigmoid(logsumexp(yes) - logsumexp(no)).
        return (logits[:, self.yes_ids].logsumexp(-1) - logits[:, self.no_ids].logsumexp(-1)).sigmoid().tolist()

    def frame_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the processor resizes a `width` x `height` image to: the frame the
        model sees it in and answers pixel coordinates in. Qwen2-VL / Qwen2.5-VL processors resize
        with `smart_resize` (sides in multiples of patch_size * merge_size, pixels within the
        processor's range, `max_pixels` overriding its top); other processors keep the original size."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor, smart_resize

        image_processor = self.processor.image_processor
        if not (isinstance(image_processor, (Qwen2VLImageProcessor, Qwen2VLImageProcessorPil)) and image_processor.do_resize):
            return width, height
        size = {**dict(image_processor.size), **self.images_kwargs.get("images_kwargs", {}).get("size", {})}
        frame_height, frame_width = smart_resize(height, width, factor=image_processor.patch_size * image_processor.merge_size,
                                                 min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        return frame_width, frame_height


def _check_samples(images: Sequence[Sequence[Image.Image]], prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} image lists for {len(prompts)} prompts")
    empty = [i for i, sample in enumerate(images) if not sample]
    if empty:
        raise ValueError(f"samples {empty} have no image; every vlm sample needs at least one")


def answer_token_ids(tokenizer, word: str) -> list[int]:
    """The token IDs that spell `word` whole as an answer's first token: its capitalised, lower and
    upper case forms, with and without a leading space (a spelling the tokenizer splits is left out)."""
    spellings = {form for base in (word.capitalize(), word.lower(), word.upper()) for form in (base, " " + base)}
    ids = sorted({ids[0] for form in spellings if len(ids := tokenizer.encode(form, add_special_tokens=False)) == 1})
    if not ids:
        raise ValueError(f"the tokenizer has no single token for {word!r}: yes_probability cannot read the answer")
    return ids
