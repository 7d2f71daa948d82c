"""Subject-count decimation: from a sample with n subjects derive the samples with n-1, ..., 2
subjects by dropping the smallest subject (by box area, as the paper) one at a time, renumbering
the IDs 1..k everywhere.

Subjects are named in text by `<sN>` tokens. When a subject is dropped it stops being a reference:
its mentions in the instruction become its category name (the target image still shows it), its
CoT entry and every CoT relation that mentions it are removed, and the layout is computed afresh
for the subjects that remain (the threshold tau and the cells a dropped subject held both depend
on who is left), by the `relayout` function the caller gives. Kept subjects keep their order and
are renumbered 1..k.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

SUBJECT_TOKEN = re.compile(r"<s(\d+)>")


def token(subject_id: int) -> str:
    return f"<s{subject_id}>"


def mentioned(text: str) -> set[int]:
    return {int(m) for m in SUBJECT_TOKEN.findall(text)}


# A token with the name annotate's repair puts after it: `<s3> (shrimp)`.
_TOKEN_AND_NAME = re.compile(r"<s(\d+)>(?: \(([^()]*)\))?")


def rewrite(text: str, new_ids: dict[int, int], dropped_names: dict[int, str]) -> str:
    """Renumber `<sN>` tokens by `new_ids`; dropped subjects become their names (`<s3> (shrimp)`
    becomes `shrimp`, not `shrimp (shrimp)`).

    >>> rewrite("put <s1> (cup) by <s3> (shrimp)", {1: 1}, {3: "shrimp"})
    'put <s1> (cup) by shrimp'
    """

    def replace(match: re.Match) -> str:
        old, named = int(match.group(1)), match.group(2)
        if old in new_ids:
            return token(new_ids[old]) + (f" ({named})" if named is not None else "")
        if old not in dropped_names:
            return match.group(0)
        return dropped_names[old] + (f" ({named})" if named is not None and named != dropped_names[old] else "")

    return _TOKEN_AND_NAME.sub(replace, text)


# The layout (grid cells of subject IDs) of a list of subjects, IDs already renumbered.
Relayout = Callable[[list[dict[str, Any]]], list[int]]


def box_area(box) -> float:
    """Area of a normalised xyxy box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def drop_subject(sample: dict[str, Any], drop_id: int, relayout: Relayout) -> dict[str, Any]:
    """`sample` without subject `drop_id`, IDs renumbered 1..k in subjects and texts, and the
    layout of the remaining subjects."""
    subjects = sample["subjects"]
    kept = [s for s in subjects if s["id"] != drop_id]
    new_ids = {s["id"]: i for i, s in enumerate(kept, 1)}
    names = {s["id"]: s["category"] for s in subjects if s["id"] == drop_id}
    out = copy.deepcopy(sample)
    out["subjects"] = [{**copy.deepcopy(s), "id": new_ids[s["id"]]} for s in kept]
    out["instruction"] = rewrite(sample["instruction"], new_ids, names)
    cot = sample["cot"]
    out["cot"] = {
        **copy.deepcopy(cot),
        "subjects": [
            {**entry, "id": new_ids[entry["id"]], **{k: rewrite(v, new_ids, names) for k, v in entry.items() if isinstance(v, str)}}
            for entry in cot["subjects"]
            if entry["id"] in new_ids
        ],
        "relations": [rewrite(r, new_ids, names) for r in cot["relations"] if drop_id not in mentioned(r)],
    }
    out["layout"] = [int(cell) for cell in relayout(out["subjects"])]
    return out


def smallest(subjects: list[dict[str, Any]]) -> dict[str, Any]:
    """The subject decimation drops next: the smallest box (on a tie, the higher ID)."""
    return min(subjects, key=lambda s: (box_area(s["box"]), -s["id"]))


def decimate(sample: dict[str, Any], relayout: Relayout, min_subjects: int = 2) -> list[dict[str, Any]]:
    """The sample itself followed by each decimation step down to `min_subjects` subjects."""
    steps = [sample]
    current = sample
    while len(current["subjects"]) > min_subjects:
        current = drop_subject(current, smallest(current["subjects"])["id"], relayout)
        steps.append(current)
    return steps
