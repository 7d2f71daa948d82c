"""Subject-count decimation: from a sample with n subjects derive the samples with n-1, ..., 2
subjects by dropping the smallest subject one at a time, renumbering the IDs 1..k everywhere.

Subjects are named in text by `<sN>` tokens. When a subject is dropped it stops being a reference:
its mentions in the instruction become its category name (the target image still shows it), its
CoT entry and every CoT relation that mentions it are removed, and its layout cells become
background. Kept subjects keep their order and are renumbered 1..k.
"""
from __future__ import annotations

import copy
import re
from typing import Any

SUBJECT_TOKEN = re.compile(r"<s(\d+)>")


def token(subject_id: int) -> str:
    return f"<s{subject_id}>"


def mentioned(text: str) -> set[int]:
    return {int(m) for m in SUBJECT_TOKEN.findall(text)}


def rewrite(text: str, new_ids: dict[int, int], dropped_names: dict[int, str]) -> str:
    """Renumber `<sN>` tokens by `new_ids`; dropped subjects become their names."""

    def replace(match: re.Match) -> str:
        old = int(match.group(1))
        if old in new_ids:
            return token(new_ids[old])
        return dropped_names.get(old, match.group(0))

    return SUBJECT_TOKEN.sub(replace, text)


def drop_subject(sample: dict[str, Any], drop_id: int) -> dict[str, Any]:
    """`sample` without subject `drop_id`, IDs renumbered 1..k in subjects, texts and layout."""
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
    out["layout"] = [new_ids.get(cell, 0) for cell in sample["layout"]]
    return out


def decimate(sample: dict[str, Any], min_subjects: int = 2) -> list[dict[str, Any]]:
    """The sample itself followed by each decimation step down to `min_subjects` subjects.

    The smallest subject (by `area`; on a tie the higher ID) is dropped at each step."""
    steps = [sample]
    current = sample
    while len(current["subjects"]) > min_subjects:
        smallest = min(current["subjects"], key=lambda s: (s["area"], -s["id"]))
        current = drop_subject(current, smallest["id"])
        steps.append(current)
    return steps
