"""The `t2i` role (prompts, seeds, size -> images) through a diffusers pipeline, FLUX.1-dev by
default, and the pipeline loading and seeding that the `editor` role shares."""
from __future__ import annotations

import inspect
from numbers import Integral
from typing import Any, ClassVar

import torch
from PIL import Image

from data_specs.roles import RoleSpec
from music_model.roles.base import Role

# Tokenizers without a length limit report this sentinel as their model_max_length.
_UNBOUNDED_LENGTH = int(1e29)


class DiffusersPipelineRole(Role):
    """A diffusers pipeline loaded with the spec's dtype and device.

    `options` are keyword arguments of the pipeline's `__call__` (steps, guidance, ...). Defaults
    in `OPTION_DEFAULTS` apply where the pipeline takes them; an option it does not take, or one
    the role sets itself, is an error at load time.
    """

    OPTION_DEFAULTS: ClassVar[dict[str, Any]] = {}
    # Call arguments the role computes per batch; an option may not override them.
    ROLE_ARGUMENTS: ClassVar[frozenset[str]] = frozenset(
        {"prompt", "image", "generator", "width", "height", "output_type", "return_dict", "num_images_per_prompt",
         "max_area", "_auto_resize"}
    )

    def __init__(self, spec: RoleSpec):
        super().__init__(spec)
        self.pipeline = self.load_pipeline()
        self.pipeline.set_progress_bar_config(disable=True)
        self.call_options = self._call_options()
        # Height and width must divide into whole latent patches: for FLUX, the VAE's 8x times 2x2 packing.
        self.size_multiple = int(self.pipeline.image_processor.config.vae_scale_factor)

    @property
    def pipeline_name(self) -> str:
        return type(self.pipeline).__name__

    def accepts(self, argument: str) -> bool:
        return argument in inspect.signature(self.pipeline.__call__).parameters

    def _call_options(self) -> dict[str, Any]:
        given = dict(self.spec.options)
        for name in given:
            if name in self.ROLE_ARGUMENTS:
                raise ValueError(f"options.{name}: set by the {self.spec.role} role itself, not an option")
            if not self.accepts(name):
                raise ValueError(f"options.{name}: {self.pipeline_name}.__call__ takes no such argument")
        options = {name: value for name, value in self.OPTION_DEFAULTS.items() if self.accepts(name)} | given
        if "max_sequence_length" in options:
            options["max_sequence_length"] = self._fit_sequence_length(
                options["max_sequence_length"], explicit="max_sequence_length" in given
            )
        return options

    def _fit_sequence_length(self, length: int, explicit: bool) -> int:
        """The prompt length in tokens, checked against the long-prompt tokenizer (T5 for FLUX); the
        default shrinks to a shorter tokenizer limit, an explicit option that does not fit is an error."""
        tokenizer = getattr(self.pipeline, "tokenizer_2", None) or getattr(self.pipeline, "tokenizer", None)
        limit = getattr(tokenizer, "model_max_length", _UNBOUNDED_LENGTH)
        if limit >= _UNBOUNDED_LENGTH or length <= limit:
            return length
        if explicit:
            raise ValueError(
                f"options.max_sequence_length: {length} exceeds the {type(tokenizer).__name__} limit of {limit} tokens"
            )
        return limit

    def check_size(self, width: int, height: int) -> tuple[int, int]:
        """`(width, height)` as ints, or an error when the pipeline cannot render that size."""
        if not all(isinstance(v, Integral) and v > 0 and v % self.size_multiple == 0 for v in (width, height)):
            raise ValueError(
                f"width and height must be positive multiples of {self.size_multiple} for {self.pipeline_name}; "
                f"got {width}x{height}"
            )
        return int(width), int(height)

    def round_size(self, length: int) -> int:
        """`length` rounded to the nearest valid multiple (at least one multiple)."""
        return max(self.size_multiple, round(length / self.size_multiple) * self.size_multiple)

    @staticmethod
    def generators(seeds: list[int]) -> list[torch.Generator]:
        """One generator per sample, so a sample's noise depends only on its own seed; CPU generators
        give the same noise on every device. Outputs are bit-identical for the same seeds and batch;
        in another batch composition they differ only by float rounding (<= 1/255 seen on CPU fp32)."""
        return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]

    def run(self, seeds: list[int], **arguments: Any) -> list[Image.Image]:
        """One pipeline call over one batch."""
        with torch.inference_mode():
            output = self.pipeline(
                **arguments, generator=self.generators(seeds), output_type="pil", **self.call_options
            )
        return [image.convert("RGB") for image in output.images]


def check_lengths(**lists: list) -> int:
    """The common length of per-sample lists; a mismatch names the lists and their lengths."""
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) > 1:
        counts = ", ".join(f"{length} {name}" for name, length in lengths.items())
        raise ValueError(f"one entry per sample expected, got {counts}")
    return next(iter(lengths.values()))


class DiffusersT2I(DiffusersPipelineRole):
    """Text to image. Options: num_inference_steps (28), guidance_scale (3.5), max_sequence_length
    (512, or the T5 tokenizer's limit when shorter), or any other argument of the pipeline call."""

    OPTION_DEFAULTS = {"num_inference_steps": 28, "guidance_scale": 3.5, "max_sequence_length": 512}

    def generate(self, prompts: list[str], seeds: list[int], width: int, height: int) -> list[Image.Image]:
        """One `width` x `height` RGB image per prompt, the i-th from seed `seeds[i]`."""
        count = check_lengths(prompts=prompts, seeds=seeds)
        width, height = self.check_size(width, height)
        return self.run_batched(count, lambda batch: self.run(
            [seeds[i] for i in batch], prompt=[prompts[i] for i in batch], width=width, height=height
        ))
