"""Schema-constrained generation shared by the `llm` and `vlm` roles.

Decoding is constrained by an xgrammar grammar compiled from the pydantic schema, so every finished
generation is JSON of the schema's shape; pydantic then validates it (validators, cross-field rules).
A row that still fails is retried with a seed derived from `(seed, attempt)` and, after
`max_attempts`, returned with `value=None` and the reason: a bad generation never raises and never
costs the other rows of its batch.

Sampling draws Gumbel noise from one `torch.Generator` per row and then decodes greedily
(`argmax(logits / T + Gumbel)` is a sample of `softmax(logits / T)`), so a row's sample depends on
its own seed only, not on which rows share its batch.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Mapping

import torch
import xgrammar as xgr
from pydantic import BaseModel, Field, StringConstraints, ValidationError
from transformers import LogitsProcessor, LogitsProcessorList

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_ATTEMPTS = 3

# Everything except `"`, `\`, control characters and DEL: the JSON text of such a string is the
# string itself, so the regex bounds the value exactly (xgrammar's `maxLength` alone lets raw control
# characters through, which is invalid JSON).
_SAFE_CHAR = r'[^"\\\x00-\x1f\x7f]'
_SAFE_FIRST_CHAR = r'[^ "\\\x00-\x1f\x7f]'
_TINY = torch.finfo(torch.float32).tiny


def bounded_text(max_length: int, min_length: int = 1) -> Any:
    """A string type of `min_length..max_length` characters with no control characters, double
    quotes or backslashes, that does not start with a space; for fields of constrained schemas."""
    if not 1 <= min_length <= max_length:
        raise ValueError(f"bounded_text needs 1 <= min_length <= max_length, got {min_length}, {max_length}")
    pattern = f"^{_SAFE_FIRST_CHAR}{_SAFE_CHAR}{{{min_length - 1},{max_length - 1}}}$"
    return Annotated[str, StringConstraints(pattern=pattern)]


def bounded_int(ge: int, le: int) -> Any:
    """An integer type in `[ge, le]`."""
    return Annotated[int, Field(ge=ge, le=le)]


def bounded_list(item: Any, max_length: int, min_length: int = 0) -> Any:
    """A list type of `min_length..max_length` items of type `item`."""
    return Annotated[list[item], Field(min_length=min_length, max_length=max_length)]


@dataclass
class StructuredResult:
    """One row's outcome: the validated object, or None with the reason in `error`; `attempts`
    counts the generations tried (0 when the input was rejected before any)."""

    value: BaseModel | None
    text: str
    error: str | None
    attempts: int

    @property
    def ok(self) -> bool:
        return self.value is not None


@dataclass(frozen=True)
class DecodeOptions:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    @classmethod
    def from_options(cls, options: Mapping[str, Any], other_keys: Sequence[str] = ()) -> "DecodeOptions":
        """Read and check the decoding keys of a role spec's `options`; `other_keys` are the role's own."""
        known = {"max_new_tokens", "temperature", "max_attempts", *other_keys}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"options.{unknown[0]}: unknown option; known: {', '.join(sorted(known))}")
        decoded = cls(
            max_new_tokens=options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
            temperature=options.get("temperature", DEFAULT_TEMPERATURE),
            max_attempts=options.get("max_attempts", DEFAULT_MAX_ATTEMPTS),
        )
        for key in ("max_new_tokens", "max_attempts"):
            value = getattr(decoded, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"options.{key}: must be a positive integer, got {value!r}")
        if isinstance(decoded.temperature, bool) or not isinstance(decoded.temperature, (int, float)) or decoded.temperature < 0:
            raise ValueError(f"options.temperature: must be a number >= 0, got {decoded.temperature!r}")
        return decoded


def attempt_seed(seed: int, attempt: int) -> int:
    """The sampling seed of a row's attempt: a stable hash of `(seed, attempt)`."""
    digest = hashlib.sha256(f"{seed}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _ConstrainedSampler(LogitsProcessor):
    """Grammar mask, banned tokens and per-row Gumbel noise, for one `generate` call (its matchers
    carry the rows' grammar state across steps)."""

    def __init__(self, grammar: xgr.CompiledGrammar, seeds: Sequence[int], temperature: float, banned: torch.Tensor):
        self.matchers = [xgr.GrammarMatcher(grammar) for _ in seeds]
        self.bitmask = xgr.allocate_token_bitmask(len(seeds), grammar.tokenizer_info.vocab_size)
        self.seeds = list(seeds)
        self.temperature = temperature
        self.banned = banned
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
            self.banned = self.banned.to(scores.device)
        else:  # the previous step's tokens
            for row, matcher in enumerate(self.matchers):
                token = int(input_ids[row, -1])
                if not matcher.is_terminated() and not matcher.accept_token(token):
                    raise RuntimeError(f"grammar rejected token {token} it had allowed (row {row})")
        for row, matcher in enumerate(self.matchers):
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(self.bitmask, row)
        # xgrammar masks on CPU or CUDA tensors only.
        masked = scores if scores.device.type in ("cpu", "cuda") else scores.cpu()
        xgr.apply_token_bitmask_inplace(masked, self.bitmask.to(masked.device))
        scores = masked.to(scores.device)
        # The grammar takes a special token's text literally (`<|image_pad|>` fits inside a string).
        scores[:, self.banned] = float("-inf")
        if self.temperature > 0:
            scores = scores / self.temperature
            for row, generator in enumerate(self.generators):
                exponential = torch.empty(scores.shape[1], device=scores.device).exponential_(generator=generator)
                scores[row] -= exponential.clamp_min_(_TINY).log_()  # -log(Exp(1)) is Gumbel(0, 1)
        return scores


class StructuredDecoder:
    """Schema-constrained batched generation for one loaded model and its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any):
        self.model = model
        self.tokenizer = tokenizer
        config = model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the model has no eos_token_id (generation_config or tokenizer): cannot end a generation")
        self.stop_ids = [eos] if isinstance(eos, int) else list(eos)
        pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]
        # The output layer can be wider than the tokenizer (padded vocabularies); those ids never decode.
        vocab_size = model.get_output_embeddings().weight.shape[0]
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_ids)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        banned = (set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)) - set(self.stop_ids)
        banned |= set(range(len(tokenizer), vocab_size))
        self.banned = torch.tensor(sorted(banned), dtype=torch.long)
        self._grammars: dict[str, xgr.CompiledGrammar] = {}
        self._lock = threading.Lock()

    def grammar(self, schema: type[BaseModel]) -> xgr.CompiledGrammar:
        """The compiled grammar of `schema`, compiled once per decoder."""
        key = json.dumps(schema.model_json_schema())  # property order kept: the model writes fields in it
        with self._lock:
            if key not in self._grammars:
                try:
                    # Compact separators: no free whitespace for a weak model to loop on.
                    self._grammars[key] = self.compiler.compile_json_schema(key, any_whitespace=False)
                except Exception as error:
                    raise ValueError(f"xgrammar cannot compile the JSON schema of {schema.__name__}: {str(error).strip()}") from error
            return self._grammars[key]

    def generate(
        self,
        encode: Callable[[Sequence[int]], Mapping[str, torch.Tensor]],
        n: int,
        schema: type[BaseModel],
        seeds: Sequence[int],
        batch_size: int,
        options: DecodeOptions,
    ) -> list[StructuredResult]:
        """Generate `n` schema objects. `encode(rows)` returns the model inputs (left-padded) of those
        rows; it may raise ValueError for a bad input, which fails that row only."""
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} inputs")
        grammar = self.grammar(schema)
        results: list[StructuredResult | None] = [None] * n
        # With temperature 0 a retry would repeat the same text.
        attempts = options.max_attempts if options.temperature > 0 else 1
        pending = list(range(n))
        for attempt in range(attempts):
            for start in range(0, len(pending), batch_size):
                rows, inputs = self._encode(encode, pending[start : start + batch_size], results)
                if not rows:
                    continue
                row_seeds = [attempt_seed(seeds[i], attempt) for i in rows]
                for i, (text, finished) in zip(rows, self.decode(inputs, grammar, row_seeds, options)):
                    value, error = _validate(schema, text, finished, options.max_new_tokens)
                    results[i] = StructuredResult(value, text, error, attempt + 1)
            pending = [i for i in pending if not results[i].ok and results[i].attempts == attempt + 1]
            if not pending:
                break
        return results

    @staticmethod
    def _encode(encode, rows: list[int], results: list[StructuredResult | None]):
        """Encode `rows` together; when that fails, row by row, recording each bad input's reason."""
        try:
            return rows, encode(rows)
        except ValueError:
            pass
        good = []
        for i in rows:
            try:
                encode([i])
                good.append(i)
            except ValueError as error:
                results[i] = StructuredResult(None, "", f"input rejected: {error}", 0)
        return (good, encode(good)) if good else ([], None)

    @torch.inference_mode()
    def decode(self, inputs, grammar, seeds: list[int], options: DecodeOptions) -> list[tuple[str, bool]]:
        """One constrained generation over encoded `inputs`: (text, finished) per row, no validation
        or retry (the planner uses it with grammars of its own)."""
        sampler = _ConstrainedSampler(grammar, seeds, options.temperature, self.banned)
        output = self.model.generate(
            **inputs,
            logits_processor=LogitsProcessorList([sampler]),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=options.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :].cpu()
        finished = torch.isin(new_tokens, torch.tensor(self.stop_ids)).any(dim=1).tolist()
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return list(zip(texts, finished))


def _validate(schema: type[BaseModel], text: str, finished: bool, max_new_tokens: int) -> tuple[BaseModel | None, str | None]:
    """The validated object, or None and why. Text that validates counts even without its end
    token (the grammar allowed nothing else after it)."""
    if not text:
        return None, "no output"
    try:
        return schema.model_validate_json(text), None
    except ValidationError as error:
        if not finished:
            return None, f"unfinished: the output did not end within max_new_tokens={max_new_tokens}"
        return None, f"invalid {schema.__name__}: {error}"
