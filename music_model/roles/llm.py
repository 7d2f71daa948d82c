"""The `llm` role: prompts + pydantic schema -> validated objects, from a transformers causal LM."""
from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from data_specs.roles import RoleSpec
from music_model.roles.base import Role
from music_model.roles.structured import DecodeOptions, StructuredDecoder, StructuredResult


class TransformersLLM(Role):
    """A chat LLM (default Qwen3) with schema-constrained decoding.

    Options (`structured.DecodeOptions`; defaults: Qwen3's non-thinking recommendation):
    `temperature` (0.7; 0 is greedy), `top_k` (20), `top_p` (0.8), `repetition_penalty` (1.0),
    `max_attempts` (3), `max_new_tokens` (default: each schema's bound; a value only raises it).
    `options.record()` is what was used.
    """

    def __init__(self, spec: RoleSpec):
        super().__init__(spec)
        self.options = DecodeOptions.from_options(spec.options)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            self.path, trust_remote_code=spec.trust_remote_code, padding_side="left", revision=spec.revision
        )
        if not self.tokenizer.chat_template:
            raise ValueError(f"model {spec.model}: the tokenizer has no chat template; the llm role needs a chat model")
        self.model = self.load_pretrained(AutoModelForCausalLM)
        self.decoder = StructuredDecoder(self.model, self.tokenizer)

    def chat_text(self, prompt: str, system: str | None = None) -> str:
        """The prompt as the model's chat template renders it, ready for the assistant's answer."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        # Qwen3's template reads enable_thinking: the answer must start with the JSON, not a thinking block.
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )

    def generate(
        self,
        prompts: Sequence[str],
        schema: type[BaseModel],
        seeds: Sequence[int],
        system: str | None = None,
    ) -> list[StructuredResult]:
        """One `StructuredResult` per prompt, in order; a failed row has `value=None` and the reason."""

        def encode(rows: Sequence[int]):
            texts = [self.chat_text(prompts[i], system) for i in rows]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            return batch.to(self.device)

        return self.decoder.generate(encode, len(prompts), schema, seeds, self.run_batched, self.options)
