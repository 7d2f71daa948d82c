"""Category names as English nouns (the `inflect` library): one of a category for a sentence
("a sneaker" for "sneakers"), and whether a text names a category in the singular or the plural
("knives" for "knife", "people" for "person", "cookie" for "cookies").

>>> with_article("sneakers"), with_article("apple"), with_article("scissors")
('a sneaker', 'an apple', 'a pair of scissors')
>>> names("Two knives and a strawberry on a board", "knife")
True
"""
from __future__ import annotations

import re
from functools import lru_cache

import inflect

_english = inflect.engine()
# Nouns with no singular: one of them is a pair. inflect knows some ("scissors"); the rest it would
# cut to another word ("glasses" -> "glass", "tongs" -> "tong").
_PAIRS = frozenset({"binoculars", "glasses", "headphones", "pliers", "scissors", "tongs", "tweezers", "trousers", "pants", "shorts",
                    "jeans", "sunglasses", "goggles"})


def _plural_of_own_singular(name: str) -> str | None:
    """The singular of `name` when `name` reads as its plural, else None. inflect's singular_noun
    assumes a plural and cuts any final "s" ("bus" -> "bu"): a name counts as plural only when its
    singular pluralises back to it and the name does not pluralise and singularise back to itself."""
    single = _english.singular_noun(name)
    if not single or single == name or _english.plural_noun(single) != name:
        return None
    plural = _english.plural_noun(name)
    return None if plural != name and _english.singular_noun(plural) == name else single


@lru_cache(maxsize=4096)
def singular(name: str) -> str:
    """The name of one thing of category `name`: "sneakers" -> "sneaker", "scissors" -> "pair of
    scissors"; a singular name is returned as it is."""
    name = " ".join(name.split())
    if name.split(" ")[-1].lower() in _PAIRS:
        return f"pair of {name}"
    return _plural_of_own_singular(name) or name


def with_article(name: str) -> str:
    """One of category `name` with its indefinite article, for a sentence: "a sneaker", "an apple"."""
    return _english.a(singular(name))


@lru_cache(maxsize=4096)
def forms(name: str) -> tuple[str, ...]:
    """The lowercased singular and plural of category `name` (irregular plurals included), and the
    name itself."""
    name = " ".join(name.lower().split())
    if name.split(" ")[-1] in _PAIRS:
        return (name,)
    single = _plural_of_own_singular(name) or name
    return tuple(dict.fromkeys([name, single, _english.plural_noun(single)]))


def names(text: str, name: str) -> bool:
    """Whether `text` names category `name`, in the singular or the plural: whole words, any case,
    any whitespace between the words of the name."""
    for form in forms(name):
        words = r"\s+".join(map(re.escape, form.split()))
        if re.search(rf"(?<!\w){words}(?!\w)", text, re.IGNORECASE):
            return True
    return False
