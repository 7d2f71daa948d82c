"""Tokenizers for the tiny zoo, built offline in the real formats (byte-level BPE for Qwen and
CLIP, WordPiece for BERT, Unigram for T5) from a small fixed vocabulary, so that every tokenizer
class loads with `from_pretrained` and round-trips ordinary English prompts."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

_COMMON = """a an the of in on at to with and or is are be by for from as it its this that these
those photo image picture scene view left right top bottom front back behind next near under
above below beside between center middle small large big red green blue white black yellow
brown gray grey wooden metal glass table room street park kitchen garden subject id ids
instruction layout reasoning placement relation role reference target object objects yes no
true false there two three four five six seven eight nine ten eleven twelve one new pose
person dog cat bird car box cup bottle chair sofa bed lamp plant tree sky grass water""".split()


@lru_cache(maxsize=1)
def words() -> tuple[str, ...]:
    """The zoo vocabulary: common prompt words and the words of the Objects365 categories."""
    text = resources.files("data_specs").joinpath("data/objects365_categories.txt").read_text()
    found = set(_COMMON)
    for line in text.splitlines():
        for word in line.replace("/", " ").replace("-", " ").replace("&", " ").split():
            word = "".join(ch for ch in word.lower() if ch.isalnum())
            if len(word) > 1:
                found.add(word)
    return tuple(sorted(found))


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for byte in range(256):
        if byte not in keep:
            keep.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(keep, chars)}


def _merges_for(word: str, suffix: str = "") -> list[tuple[str, str]]:
    """Left-to-right merges that rebuild `word` (already byte-mapped) from its characters."""
    merges = []
    current = word[0]
    pieces = list(word[1:])
    for i, char in enumerate(pieces):
        char = char + suffix if i == len(pieces) - 1 else char
        merges.append((current, char))
        current += char
    return merges


def byte_level_bpe(prefix_space: bool) -> tuple[dict[str, int], list[str]]:
    """Vocab and merges of a byte-level BPE over the zoo words (`Ġword` forms when `prefix_space`)."""
    table = _byte_to_unicode()
    vocab = {char: i for i, char in enumerate(table[b] for b in range(256))}
    merges: list[str] = []
    for word in words():
        mapped = "".join(table[b] for b in ((" " + word) if prefix_space else word).encode())
        for left, right in _merges_for(mapped):
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append(f"{left} {right}")
    return vocab, merges


def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """Vocab and merges in CLIP's format: byte chars, their `</w>` forms, whole zoo words."""
    table = _byte_to_unicode()
    chars = [table[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in words():
        if len(word) < 2:
            continue
        for left, right in _merges_for(word, suffix="</w>"):
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append(f"{left} {right}")
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def write_clip_tokenizer(folder: Path, max_length: int = 77) -> None:
    """A `CLIPTokenizer` folder (vocab.json, merges.txt, tokenizer.json) as CLIP checkpoints ship it."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=max_length)
    tokenizer.save_pretrained(folder)


def write_bert_vocab(path: Path) -> None:
    """A WordPiece `vocab.txt` for BertTokenizer: specials, characters, `##` continuations, words."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)]
    tokens = specials + chars
    tokens += ["##" + c for c in chars] + [w for w in words() if w not in chars]
    seen, ordered = set(), []
    for token in tokens:
        if token not in seen:
            seen.add(token)
            ordered.append(token)
    path.write_text("\n".join(ordered) + "\n")


def unigram_pieces() -> list[tuple[str, float]]:
    """SentencePiece-style Unigram pieces for a T5 tokenizer: specials, characters, `▁word`s."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -5.0) for c in range(33, 127)]
    pieces += [("▁" + w, -1.0 - len(w) / 100) for w in words()]
    return pieces
