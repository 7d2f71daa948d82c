"""Schema-constrained generation shared by the `llm` and `vlm` roles.

Decoding is constrained by an xgrammar grammar compiled from the pydantic schema, so every finished
generation is JSON of the schema's shape; pydantic then validates it (validators, cross-field rules).
A row that still fails is retried with a seed derived from `(seed, attempt)` and, after
`max_attempts`, returned with `value=None` and the reason: a bad generation never raises and never
costs the other rows of its batch.

Sampling is explicit and never inherited from a checkpoint's `generation_config`: the decoder
replaces it by one holding only the special token IDs, and every call passes the spec's settings.
The defaults are Qwen3's recommendation for non-thinking mode (temperature 0.7, top-k 20, top-p
0.8) with repetition penalty 1.0 (a penalty would also punish the repeated digits of layout grids
and the repeated `<sN>` tags). After the repetition penalty and the grammar mask, the logits are
divided by the temperature, cut to the top-k and then to the top-p nucleus, and sampled with
Gumbel noise from one `torch.Generator` per row (`argmax(logits / T + Gumbel)` is a sample of
`softmax(logits / T)`), so a row's noise depends on its own seed only, not on its batch. Its logits
need not: in float32 on a CPU they come out the same in any batch, but in bfloat16 on a GPU the
batch's size and padding pick other matmul and attention kernels whose rounding differs, so the
same seed in another batch can sample another text (a role's batch size is recorded in the
shard markers, not in the fingerprints).

Token budget: `schema_token_budget` bounds the longest JSON text a schema admits (every string,
list and integer is bounded) in UTF-8 bytes, and a generated token is at least one byte, so a
budget of that many tokens (+1 for the end token) never cuts a valid answer, whatever the
tokenizer. A spec's `max_new_tokens` can raise the budget, never lower it.

Prompts end with `describe_schema` (the fields and bounds the grammar enforces), and a stage passes
each bounded text through `end_at_word`: at its bound the grammar forced the closing quote, maybe
mid-word or mid-tag.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Mapping

import torch
import xgrammar as xgr
from pydantic import BaseModel, Field, StringConstraints, ValidationError
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from music_model.roles.kernels import bitmask_backend
from music_model.roles.slots import device_current

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_K = 20
DEFAULT_TOP_P = 0.8
DEFAULT_REPETITION_PENALTY = 1.0
DEFAULT_MAX_ATTEMPTS = 3
# xgrammar's default for compact JSON (any_whitespace=False), spelled out so the budget counts them.
SEPARATORS = (", ", ": ")
_MAX_UTF8_BYTES = 4  # per character of a bounded_text string (no escapes: quotes and backslashes are excluded)
_MAX_ESCAPED_BYTES = 12  # per character of a plain maxLength string: a surrogate pair `\uXXXX\uXXXX`

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


# The pattern bounded_text writes, read back by the token budget and the prompts' field list:
# groups 1 and 2 are min_length - 1 and max_length - 1.
_BOUNDED_PATTERN = re.compile(re.escape(f"^{_SAFE_FIRST_CHAR}{_SAFE_CHAR}{{") + r"(\d+),(\d+)\}\$")


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


def _count(value: Any) -> bool:
    return isinstance(value, int) and value >= 1


def _number(value: Any) -> bool:
    return isinstance(value, (int, float))


# Each decoding option: (valid?, what a valid value is); booleans are never valid.
_OPTION_CHECKS = {
    "max_new_tokens": (lambda v: v is None or _count(v), "a positive integer"),
    "max_attempts": (_count, "a positive integer"),
    "top_k": (lambda v: v is None or _count(v), "a positive integer"),
    "temperature": (lambda v: _number(v) and v >= 0, "a number >= 0 (0 is greedy)"),
    "top_p": (lambda v: v is None or (_number(v) and 0 < v <= 1), "a number in (0, 1]"),
    "repetition_penalty": (lambda v: _number(v) and v > 0, "a number > 0 (1.0 is none)"),
}


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings of a role. `max_new_tokens` None: each schema's own budget."""

    max_new_tokens: int | None = None
    temperature: float = DEFAULT_TEMPERATURE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    top_k: int | None = DEFAULT_TOP_K
    top_p: float | None = DEFAULT_TOP_P
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY

    KEYS = ("max_new_tokens", "temperature", "max_attempts", "top_k", "top_p", "repetition_penalty")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], other_keys: Sequence[str] = ()) -> "DecodeOptions":
        """Read and check the decoding keys of a role spec's `options`; `other_keys` are the role's own."""
        known = {*cls.KEYS, *other_keys}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"options.{unknown[0]}: unknown option; known: {', '.join(sorted(known))}")
        decoded = cls(**{key: options[key] for key in cls.KEYS if key in options})
        for key, (ok, what) in _OPTION_CHECKS.items():
            value = getattr(decoded, key)
            if isinstance(value, bool) or not ok(value):
                raise ValueError(f"options.{key}: must be {what}, got {value!r}")
        return decoded

    def budget(self, schema: type[BaseModel]) -> int:
        """The max_new_tokens of one generation of `schema`: its own bound, or the spec's when larger."""
        return max(schema_token_budget(schema), self.max_new_tokens or 0)

    def record(self) -> dict[str, Any]:
        """The settings as cards and reports show them."""
        return {
            "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty, "max_attempts": self.max_attempts,
            "max_new_tokens": self.max_new_tokens or "derived from each schema's bounds",
        }


def decode_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """The decoding settings an `llm` or `vlm` role spec with these `options` uses, without loading it."""
    return DecodeOptions.from_options(options, other_keys=[k for k in options if k not in DecodeOptions.KEYS]).record()


# --- token budgets --------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def schema_token_budget(schema: type[BaseModel]) -> int:
    """Tokens that always hold the longest JSON text of `schema`, plus the end token (module doc)."""
    return max_json_bytes(schema.model_json_schema()) + 1


def max_json_bytes(node: Mapping[str, Any], defs: Mapping[str, Any] | None = None, where: str = "") -> int:
    """UTF-8 bytes of the longest JSON value of a JSON schema node, written with `SEPARATORS`;
    a ValueError names a field that has no bound."""
    defs = node.get("$defs", {}) if defs is None else defs
    comma, colon = (len(sep) for sep in SEPARATORS)
    if "$ref" in node:
        return max_json_bytes(defs[node["$ref"].rsplit("/", 1)[-1]], defs, where)
    if "const" in node or "enum" in node:
        values = [node["const"]] if "const" in node else node["enum"]
        return max(len(json.dumps(v, ensure_ascii=False).encode()) for v in values)
    if "anyOf" in node:
        return max(max_json_bytes(option, defs, where) for option in node["anyOf"])
    kind = node.get("type")
    if kind == "object":
        properties = node.get("properties", {})
        if not properties:
            raise ValueError(f"{where or 'schema'}: an object without declared properties has no length bound")
        fields = [len(json.dumps(name, ensure_ascii=False).encode()) + colon + max_json_bytes(value, defs, f"{where}.{name}".lstrip("."))
                  for name, value in properties.items()]
        return 2 + sum(fields) + comma * (len(fields) - 1)
    if kind == "array":
        if "maxItems" not in node:
            raise ValueError(f"{where or 'schema'}: a list without max_length has no length bound")
        count = node["maxItems"]
        return 2 + count * max_json_bytes(node.get("items", {}), defs, f"{where}[]") + comma * max(count - 1, 0)
    if kind == "string":
        if "pattern" in node and (match := _BOUNDED_PATTERN.fullmatch(node["pattern"])):
            return 2 + _MAX_UTF8_BYTES * (int(match.group(2)) + 1)
        if "maxLength" in node:
            return 2 + _MAX_ESCAPED_BYTES * node["maxLength"]
        raise ValueError(f"{where or 'schema'}: a string without a length bound (use bounded_text)")
    if kind == "integer":
        if "minimum" not in node or "maximum" not in node:
            raise ValueError(f"{where or 'schema'}: an integer without both bounds (use bounded_int)")
        return max(len(str(node["minimum"])), len(str(node["maximum"])))
    if kind == "boolean":
        return len("false")
    if kind == "null":
        return len("null")
    raise ValueError(f"{where or 'schema'}: type {kind!r} has no length bound")


# --- the answer format a prompt states, and texts cut at their bound ------------------------------


def describe_schema(schema: type[BaseModel]) -> str:
    """The answer format a prompt ends with: the JSON fields of `schema` in the order the grammar
    writes them, each with its description, type and bounds, read from the schema itself so that a
    prompt never drifts from the grammar that constrains its answer.

    >>> class Note(BaseModel):
    ...     ok: bool
    ...     text: bounded_text(40) = Field(description="why")
    >>> print(describe_schema(Note))
    Answer with one JSON object with these fields, in this order:
    - "ok": true or false
    - "text" (why): text of at most 40 characters
    """
    raw = schema.model_json_schema()
    return "\n".join(["Answer with one JSON object with these fields, in this order:", *_field_lines(raw, raw.get("$defs", {}), "")])


def _field_lines(node: Mapping[str, Any], defs: Mapping[str, Any], indent: str) -> list[str]:
    lines = []
    for name, value in node.get("properties", {}).items():
        about = f" ({value['description']})" if value.get("description") else ""
        first, *nested = _describe(value, defs, indent + "  ")
        lines += [f'{indent}- "{name}"{about}: {first}', *nested]
    return lines


def _count_phrase(low: int, high: int | None, unit: str) -> str:
    if high is None:
        return f"at least {low} {unit}" if low else f"any number of {unit}"
    return f"{low} to {high} {unit}" if low else f"at most {high} {unit}"


def _describe(node: Mapping[str, Any], defs: Mapping[str, Any], indent: str) -> list[str]:
    """A schema node as a phrase, followed by the lines of its fields when it is an object."""
    if "$ref" in node:
        return _describe(defs[node["$ref"].rsplit("/", 1)[-1]], defs, indent)
    if "const" in node or "enum" in node:
        values = [node["const"]] if "const" in node else node["enum"]
        return ["one of " + ", ".join(json.dumps(v, ensure_ascii=False) for v in values)]
    if "anyOf" in node:
        return [" or ".join(_describe(option, defs, indent)[0] for option in node["anyOf"])]
    kind = node.get("type")
    if kind == "object":
        return ["an object with these fields:", *_field_lines(node, defs, indent)]
    if kind == "array":
        first, *nested = _describe(node.get("items", {}), defs, indent)
        return [f"a list of {_count_phrase(node.get('minItems', 0), node.get('maxItems'), 'items')}, each {first}", *nested]
    if kind == "string":
        if "pattern" in node and (match := _BOUNDED_PATTERN.fullmatch(node["pattern"])):
            low, high = int(match.group(1)) + 1, int(match.group(2)) + 1
        else:
            low, high = node.get("minLength", 0), node.get("maxLength")
        return [f"text of {_count_phrase(low if low > 1 else 0, high, 'characters')}"]
    if kind == "integer" and "minimum" in node and "maximum" in node:
        return [f"an integer from {node['minimum']} to {node['maximum']}"]
    return [{"integer": "an integer", "number": "a number", "boolean": "true or false", "null": "null"}.get(kind, "any JSON value")]


# A last word is whole when the text ends in one of these; after a letter, a digit, an apostrophe,
# a hyphen or an unclosed `<sN` the word (or tag) may have run on past the bound.
_WORD_ENDS = ".!?,;:)]>"
_DANGLING = ",;:-([" + " \t"
_OPEN_TAG = re.compile(r"<(s\d*)?$")


def end_at_word(text: str, max_length: int) -> str:
    """A `bounded_text(max_length)` value ended at a whole word. Shorter text ended where the
    model chose, and is returned as it is. Text at the bound was cut there by the grammar (it forces
    the closing quote), so a last word or `<sN>` tag that may run on is removed, then the separators
    left before it; "" when no whole word is left.

    >>> end_at_word("a dog beside <s1", 16)
    'a dog beside'
    >>> end_at_word("a dog and a cat.", 16)
    'a dog and a cat.'
    """
    if len(text) < max_length:
        return text
    if not (text[-1].isspace() or text[-1] in _WORD_ENDS):
        text = re.sub(r"\S+$", "", text)
    return _OPEN_TAG.sub("", text.rstrip(_DANGLING)).rstrip(_DANGLING)


def attempt_seed(seed: int, attempt: int) -> int:
    """The sampling seed of a row's attempt: a stable hash of `(seed, attempt)`."""
    digest = hashlib.sha256(f"{seed}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _ConstrainedSampler(LogitsProcessor):
    """Grammar mask, banned tokens, temperature, top-k, top-p and per-row Gumbel noise, for one
    `generate` call (its matchers carry the rows' grammar state across steps)."""

    def __init__(self, grammar: xgr.CompiledGrammar, seeds: Sequence[int], options: "DecodeOptions", banned: torch.Tensor):
        self.matchers = [xgr.GrammarMatcher(grammar) for _ in seeds]
        self.bitmask = xgr.allocate_token_bitmask(len(seeds), grammar.tokenizer_info.vocab_size)
        self.seeds = list(seeds)
        self.options = options
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
        # xgrammar masks on CPU or CUDA tensors only; its CUDA kernel launches on the current device.
        masked = scores if scores.device.type in ("cpu", "cuda") else scores.cpu()
        with device_current(masked.device):
            xgr.apply_token_bitmask_inplace(masked, self.bitmask.to(masked.device), backend=bitmask_backend(masked.device.type))
        scores = masked.to(scores.device)
        # The grammar takes a special token's text literally (`<|image_pad|>` fits inside a string).
        scores[:, self.banned] = float("-inf")
        options = self.options
        if options.temperature > 0:
            scores = truncate(scores / options.temperature, options.top_k, options.top_p)
            for row, generator in enumerate(self.generators):
                exponential = torch.empty(scores.shape[1], device=scores.device).exponential_(generator=generator)
                scores[row] -= exponential.clamp_min_(_TINY).log_()  # -log(Exp(1)) is Gumbel(0, 1)
        return scores


def truncate(scores: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """`scores` (rows x vocab) with every token outside the `top_k` best and then outside the
    smallest set holding `top_p` of the probability set to -inf, as transformers' TopK and TopP
    warpers do (the best token always stays)."""
    if top_k is not None and top_k < scores.shape[1]:
        kth = torch.topk(scores, top_k, dim=1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = torch.sort(scores, dim=1, descending=True)
        probabilities = ordered.softmax(dim=1)
        outside = probabilities.cumsum(dim=1) - probabilities >= top_p  # the mass before it already reaches top_p
        outside[:, 0] = False
        scores = scores.scatter(1, order, ordered.masked_fill(outside, float("-inf")))
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
        if tokenizer.pad_token_id is None:
            # Batches are left-padded under an attention mask, so the pad token is never read; without
            # one (Llama-style chat models) the tokenizer would refuse to pad and every row would fail.
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(self.pad_id)
        # generate() fills every setting a call leaves unset from the model's generation_config (a
        # checkpoint's repetition_penalty, top-k, suppressed tokens...): only the token IDs are kept.
        self.checkpoint_generation_config = config
        model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=self.stop_ids,
                                                   pad_token_id=self.pad_id)
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
        run_batched: Callable[[int, Callable[[range], list]], list],
        options: DecodeOptions,
    ) -> list[StructuredResult]:
        """Generate `n` schema objects. `encode(rows)` returns the model inputs (left-padded) of those
        rows; it may raise ValueError for a bad input, which fails that row only. `run_batched` is the
        role's batching (`Role.run_batched`: batch size, halving on out-of-memory)."""
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} inputs")
        grammar = self.grammar(schema)
        budget = options.budget(schema)
        results: list[StructuredResult | None] = [None] * n
        # With temperature 0 a retry would repeat the same text.
        attempts = options.max_attempts if options.temperature > 0 else 1
        pending = list(range(n))
        for attempt in range(attempts):

            def run_batch(batch: range) -> list[tuple[int, str, bool]]:
                rows, inputs = self._encode(encode, [pending[j] for j in batch], results)
                if not rows:
                    return []
                row_seeds = [attempt_seed(seeds[i], attempt) for i in rows]
                return [(i, *out) for i, out in zip(rows, self.decode(inputs, grammar, row_seeds, options, budget))]

            for i, text, finished in run_batched(len(pending), run_batch):
                value, error = _validate(schema, text, finished, budget)
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
    def decode(self, inputs, grammar, seeds: list[int], options: DecodeOptions,
               max_new_tokens: int | None = None) -> list[tuple[str, bool]]:
        """One constrained generation over encoded `inputs`: (text, finished) per row, no validation
        or retry (the planner uses it with grammars of its own). `max_new_tokens` defaults to the
        options' own, which must then be set."""
        max_new_tokens = max_new_tokens or options.max_new_tokens
        if max_new_tokens is None:
            raise ValueError("decode needs max_new_tokens: the grammar's longest output in tokens")
        sampler = _ConstrainedSampler(grammar, seeds, options, self.banned)
        output = self.model.generate(
            **inputs,
            logits_processor=LogitsProcessorList([sampler]),
            do_sample=False,  # the sampler samples: generate only takes its argmax
            num_beams=1,
            repetition_penalty=options.repetition_penalty,
            max_new_tokens=max_new_tokens,
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
