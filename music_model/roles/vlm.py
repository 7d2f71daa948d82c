"""The `vlm` role: images + prompts + pydantic schema -> validated objects, from a transformers
image-text-to-text model (default Qwen2.5-VL)."""
from __future__ import annotations

from collections.abc import Sequence

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
    """

    def __init__(self, spec: RoleSpec):
        super().__init__(spec)
        self.options = DecodeOptions.from_options(spec.options, other_keys=("max_pixels",))
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(
            self.path, trust_remote_code=spec.trust_remote_code, padding_side="left"
        )
        if not self.processor.chat_template:
            raise ValueError(f"model {spec.model}: the processor has no chat template; the vlm role needs a chat model")
        self.images_kwargs = self._images_kwargs(spec.options.get("max_pixels"))
        self.model = self.load_pretrained(AutoModelForImageTextToText)
        self.decoder = StructuredDecoder(self.model, self.processor.tokenizer)

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
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} image lists for {len(prompts)} prompts")
        empty = [i for i, sample in enumerate(images) if not sample]
        if empty:
            raise ValueError(f"samples {empty} have no image; every vlm sample needs at least one")

        def encode(rows: Sequence[int]):
            texts = [self.chat_text(len(images[i]), prompts[i], system) for i in rows]
            pixels = [[image.convert("RGB") for image in images[i]] for i in rows]
            batch = self.processor(text=texts, images=pixels, padding=True, return_tensors="pt", **self.images_kwargs)
            return batch.to(self.device)

        return self.decoder.generate(encode, len(prompts), schema, seeds, self.run_batched, self.options)
