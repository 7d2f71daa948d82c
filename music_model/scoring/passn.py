"""Pass@N: generate N candidates, keep the one a selector prefers, score that one.

Two selectors:
- `clip_t` (the paper's): the text-image cosine of a CLIP ViT-L/14 (`roles.clip_select`), which
  is not the ViT-B/32 that computes the reported CLIP-T.
- `identity_aware`: that text score plus `identity_weight` x an identity score (the grounded DINO
  mean for multi-subject cases, where a missing subject counts 0; the DINO score on DreamBench), so a
  candidate that drops a subject is not picked for matching the text.

The curve over n = 1..N is the *expected* score of the selected candidate when n of the N
candidates are drawn at random: candidate of rank r (by selector score, ascending) is selected with
probability C(r-1, n-1) / C(N, n). That is exact (no sampling), uses every candidate, does not
depend on generation order, and at n = N is the plain "best of all N" choice; at n = 1 it is the
mean over candidates.
"""
from __future__ import annotations

from math import comb
from typing import Sequence

import numpy as np

SELECTORS = ("clip_t", "identity_aware")


def selection_weights(scores: Sequence[float], n: int) -> np.ndarray:
    """P(candidate i is selected) when a random n-subset is drawn and its top scorer kept; a tie
    goes to the earlier candidate."""
    scores = np.asarray(scores, dtype=np.float64)
    total = len(scores)
    if not 1 <= n <= total:
        raise ValueError(f"n must be in 1..{total}, got {n}")
    if np.isnan(scores).any():
        raise ValueError("selection scores hold NaN (was the selector run?)")
    order = np.lexsort((-np.arange(total), scores))  # ascending; among ties the earlier candidate ranks higher
    weights = np.empty(total)
    weights[order] = [comb(rank - 1, n - 1) / comb(total, n) for rank in range(1, total + 1)]
    return weights


def selector_scores(rows: list[dict], selector: str, identity: str, identity_weight: float) -> np.ndarray:
    text = np.array([row["select_clip_t"] for row in rows], dtype=np.float64)
    if selector == "clip_t":
        return text
    if selector == "identity_aware":
        return text + identity_weight * np.array([row[identity] for row in rows], dtype=np.float64)
    raise ValueError(f"unknown selector {selector!r}; known: {', '.join(SELECTORS)}")


def passn_curve(candidates: list[dict], group_by: Sequence[str], metrics: Sequence[str], identity: str,
                identity_weight: float = 1.0, average_by: str | None = None) -> list[dict]:
    """Rows {selector, n, <metric>...} for n = 1..N (N = fewest candidates any group has).

    `group_by` names the columns that identify one prompt's candidates (a case; a DreamBench subject
    and prompt); each candidate row holds `select_clip_t`, `identity` and the `metrics`. With
    `average_by` (DreamBench: `subject`) groups are averaged within it first, then over it."""
    groups: dict[tuple, list[dict]] = {}
    for row in candidates:
        groups.setdefault(tuple(row[key] for key in group_by), []).append(row)
    if not groups:
        return []
    n_max = min(len(rows) for rows in groups.values())
    curve = []
    for selector in SELECTORS:
        for n in range(1, n_max + 1):
            expected: dict[str, list[dict]] = {}
            for rows in groups.values():
                weights = selection_weights(selector_scores(rows, selector, identity, identity_weight), n)
                values = {m: float(weights @ np.array([row[m] for row in rows], dtype=np.float64)) for m in metrics}
                expected.setdefault(rows[0][average_by] if average_by else "", []).append(values)
            point = {"selector": selector, "n": n}
            for metric in metrics:
                point[metric] = float(np.mean([np.mean([v[metric] for v in block]) for block in expected.values()]))
            curve.append(point)
    return curve
