"""The MUSIC planner: instruction + subject images -> a plan (vision chain of thought + 8x8 layout,
the text format of `plan.py`), written by a VLM (Qwen2.5-VL through the `vlm` role's loader) under
the plan grammar, then read with the plan's repair rules."""
from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from music_model.music.plan import MAX_SUBJECTS, PlanBounds, PlanReading, plan_grammar, read_plan
from music_model.subjects.decimate import token
from music_model.subjects.layout import GRID


PROMPT = "Subjects: {subjects}.\nInstruction: {instruction}\nPlan each subject's role and place, their relations and the {grid}x{grid} layout."


def planner_prompt(instruction: str, categories: Sequence[str | None], grid: int = GRID) -> str:
    """The planner's user prompt; image k is subject k, named by its tag and, when known, its category."""
    subjects = ", ".join(token(k) + (f" {c}" if c else "") for k, c in enumerate(categories, 1))
    return PROMPT.format(subjects=subjects, instruction=instruction, grid=grid)


def drop_peft_checkpointing_warning() -> None:
    """peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model
    (a FutureWarning per wrap); nothing of ours uses it, and the fix is peft's."""
    from music_model.noise import drop_warning

    drop_warning("`is_gradient_checkpointing` is deprecated", FutureWarning)


class Planner:
    """The planner model: a loaded `vlm` role (processor, model, structured decoder) that writes
    plans under the plan grammar."""

    def __init__(self, vlm, bounds: PlanBounds = PlanBounds()):
        self.vlm = vlm
        self.bounds = bounds
        self._grammars: dict[int, object] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, spec, bounds: PlanBounds = PlanBounds(), adapter: str | Path | None = None, merge: bool = True) -> "Planner":
        """The planner of a `vlm` role spec. With `adapter` (a peft LoRA folder saved by training) the
        model is a private copy, not the cached role's, with the adapter merged into its weights
        (`merge`) or kept beside them."""
        from music_model.roles import load_role
        from music_model.roles.vlm import TransformersVLM

        if adapter is None:
            return cls(load_role(spec), bounds)
        from peft import PeftModel

        from music_model.roles.structured import StructuredDecoder

        vlm = TransformersVLM(spec)
        drop_peft_checkpointing_warning()
        model = PeftModel.from_pretrained(vlm.model, str(adapter))
        vlm.model = (model.merge_and_unload() if merge else model).eval()
        vlm.decoder = StructuredDecoder(vlm.model, vlm.processor.tokenizer)
        return cls(vlm, bounds)

    @property
    def end_token_id(self) -> int:
        """The token that closes the assistant's turn (`<|im_end|>` for Qwen)."""
        return self.vlm.decoder.stop_ids[0]

    def prompt_text(self, n_images: int, instruction: str, categories: Sequence[str | None]) -> str:
        return self.vlm.chat_text(n_images, planner_prompt(instruction, categories, self.bounds.grid))

    def encode(self, images: Sequence[Sequence[Image.Image]], instructions: Sequence[str],
               categories: Sequence[Sequence[str | None]]):
        """Processor inputs (left-padded) of a batch of prompts with their subject images."""
        texts = [self.prompt_text(len(imgs), instruction, cats) for imgs, instruction, cats in zip(images, instructions, categories)]
        pixels = [[image.convert("RGB") for image in imgs] for imgs in images]
        return self.vlm.processor(text=texts, images=pixels, padding=True, return_tensors="pt", **self.vlm.images_kwargs)

    def grammar(self, n_subjects: int):
        with self._lock:
            if n_subjects not in self._grammars:
                self._grammars[n_subjects] = self.vlm.decoder.compiler.compile_grammar(plan_grammar(n_subjects, self.bounds))
            return self._grammars[n_subjects]

    def plan(self, images: Sequence[Sequence[Image.Image]], instructions: Sequence[str],
             categories: Sequence[Sequence[str | None]], seeds: Sequence[int]) -> list[PlanReading]:
        """One repaired plan per sample (`images[i]` are sample i's subjects, in ID order), each from
        its own seed; decoding is constrained to the plan grammar of the sample's subject count and
        bounded to the grammar's longest text, so it always finishes."""

        count = len(images)
        if not count == len(instructions) == len(categories) == len(seeds):
            raise ValueError(f"one entry per sample expected: {count} image lists, {len(instructions)} instructions, "
                             f"{len(categories)} category lists, {len(seeds)} seeds")
        bad = [i for i in range(count) if not 1 <= len(images[i]) <= MAX_SUBJECTS or len(categories[i]) != len(images[i])]
        if bad:
            raise ValueError(f"samples {bad}: need 1..{MAX_SUBJECTS} subject images and one category (or None) per image")
        readings: list[PlanReading | None] = [None] * count
        by_count: dict[int, list[int]] = {}
        for i in range(count):
            by_count.setdefault(len(images[i]), []).append(i)
        for n, rows in sorted(by_count.items()):

            def decode_batch(batch: range) -> list[tuple[int, str, bool]]:
                chosen = [rows[j] for j in batch]
                inputs = self.encode([images[i] for i in chosen], [instructions[i] for i in chosen],
                                     [categories[i] for i in chosen]).to(self.vlm.device)
                # The role's sampling settings, with the plan grammar's own length bound.
                decoded = self.vlm.decoder.decode(inputs, self.grammar(n), [int(seeds[i]) for i in chosen], self.vlm.options,
                                                  max_new_tokens=self.bounds.max_bytes(n) + 1)
                return [(i, *out) for i, out in zip(chosen, decoded)]

            with self.vlm.lock:
                decoded = self.vlm.run_batched(len(rows), decode_batch)
            for i, text, finished in decoded:
                reading = read_plan(text, n, categories[i], self.bounds.grid)
                if not finished and reading.ok:
                    reading.repairs.append("output ended without its end token")
                reading.seed = int(seeds[i])
                readings[i] = reading
        return readings
