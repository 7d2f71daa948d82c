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
from typing import Callable, Sequence

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


# --- Pass@N below linear cost ------------------------------------------------------------------------
# One rendering pass serves every strategy: each case's N candidates are denoised to the end, each
# one alone (music_model.music.trajectory), and the selector's score of every candidate's predicted
# clean image is recorded after every step. A survivor of pruning continues the same trajectory, so
# its final image is that pass's image (tests/test_passn_budget.py), and a strategy is replayed
# exactly from the records: which candidates it renders, how far, and which one it keeps.


def _ranked(values: dict[int, float], among: Sequence[int]) -> list[int]:
    """`among` best first by value; a tie goes to the earlier candidate (as `selection_weights`)."""
    return sorted(among, key=lambda k: (-values[k], k))


def halving(fraction: float = 0.5, minimum: int = 1) -> Callable[[int, list[int], list[float]], list[int]]:
    """Successive halving: keep the best `fraction` of the live candidates (at least `minimum`); a
    tie goes to the earlier candidate, as in Pass@N selection."""

    def keep(step: int, live: list[int], scores: list[float]) -> list[int]:
        count = max(minimum, int(round(len(live) * fraction)))
        order = sorted(range(len(live)), key=lambda j: (-scores[j], live[j]))
        return [live[j] for j in order[:count]]

    return keep


def replay(rows: list[dict], steps: int, tokens: int, screen_keep: int | None = None, prune_at: Sequence[int] = (),
           prune_fraction: float = 0.5) -> tuple[int, dict]:
    """The candidate a strategy keeps for one case, and what it spent. `rows` are the case's
    candidates (candidate, plan_score, step_scores {step: selector score}, select_clip_t). Costs:
    denoising steps (and x latent tokens), VAE decodes (previews and finals), selector calls
    (previews and the final choice), renders (candidates denoised to the end)."""
    keep = halving(prune_fraction)
    by_index = {row["candidate"]: row for row in rows}
    live = sorted(by_index)
    if screen_keep is not None:
        live = sorted(_ranked({k: by_index[k]["plan_score"] for k in live}, live)[:screen_keep])
    cost = {"denoise_steps": 0, "decodes": 0, "selector_calls": 0}
    for step in range(steps):
        cost["denoise_steps"] += len(live)
        if step in prune_at and step < steps - 1:
            cost["decodes"] += len(live)
            cost["selector_calls"] += len(live)
            live = sorted(keep(step, live, [by_index[k]["step_scores"][step] for k in live]))
    cost["decodes"] += len(live)
    cost["selector_calls"] += len(live)
    cost["renders"] = len(live)
    cost["latent_token_steps"] = cost["denoise_steps"] * tokens
    chosen = _ranked({k: by_index[k]["select_clip_t"] for k in live}, live)[0]
    return chosen, cost


def strategies(candidates: int, prune_at: Sequence[int], prune_fraction: float, screen_keep: int) -> dict[str, dict]:
    """The strategies a budget report replays: `full`, plan screening at the spec's k and at N/4,
    pruning on the spec's schedule and a harder one (a quarter kept after the first step), and
    screening then pruning."""
    quarter = max(1, candidates // 4)
    table = {"full": {}, f"screen-{screen_keep}": {"screen_keep": screen_keep}}
    if quarter != screen_keep:
        table[f"screen-{quarter}"] = {"screen_keep": quarter}
    schedule = ",".join(map(str, prune_at))
    table[f"prune-{schedule}x{prune_fraction:g}"] = {"prune_at": list(prune_at), "prune_fraction": prune_fraction}
    table["prune-0x0.25"] = {"prune_at": [0], "prune_fraction": 0.25}
    table[f"screen-{screen_keep}+prune-{schedule}x{prune_fraction:g}"] = {"screen_keep": screen_keep, "prune_at": list(prune_at),
                                                                          "prune_fraction": prune_fraction}
    return table


def _retained(picked: np.ndarray, single: np.ndarray, best: np.ndarray) -> float:
    gain = best.mean() - single.mean()
    return float((picked.mean() - single.mean()) / gain) if abs(gain) > 1e-12 else float("nan")


def budget_table(candidates: list[dict], metrics: Sequence[str], steps: int, tokens: int, plans: dict[str, dict],
                 samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> list[dict]:
    """Per strategy (and best-of-k, the baseline at equal cost): mean cost per case and, per metric,
    the mean score of the kept candidate and the retained gain R = (S(C) - S_1) / (S_N - S_1), S_1
    the mean over candidates (one sample) and S_N `full`'s pick, with a paired percentile-bootstrap
    interval over cases (the same resampled cases for S(C), S_1 and S_N)."""
    groups: dict[str, list[dict]] = {}
    for row in candidates:
        groups.setdefault(row["case_id"], []).append(row)
    cases = sorted(groups)
    n = min(len(rows) for rows in groups.values())
    values = {m: {c: {r["candidate"]: r[m] for r in groups[c]} for c in cases} for m in metrics}
    single = {m: np.array([np.mean(list(values[m][c].values())) for c in cases]) for m in metrics}
    full_pick = {c: replay(groups[c], steps, tokens)[0] for c in cases}
    best = {m: np.array([values[m][c][full_pick[c]] for c in cases]) for m in metrics}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(cases), size=(samples, len(cases)))
    tail = (1 - confidence) / 2 * 100

    def row_of(name: str, picked: dict[str, np.ndarray], cost: dict[str, float]) -> dict:
        row: dict = {"strategy": name, **cost}
        for m in metrics:
            row[m] = float(picked[m].mean())
            row[f"R_{m}"] = _retained(picked[m], single[m], best[m])
            boot = [_retained(picked[m][d], single[m][d], best[m][d]) for d in draws]
            low, high = np.nanpercentile(boot, [tail, 100 - tail]) if not np.isnan(boot).all() else (float("nan"),) * 2
            row[f"R_{m}_ci_low"], row[f"R_{m}_ci_high"] = float(low), float(high)
        return row

    table = []
    for k in range(1, n + 1):
        # best of k random candidates, expected exactly (selection_weights), at k full renders
        weights = {c: selection_weights([r["select_clip_t"] for r in sorted(groups[c], key=lambda r: r["candidate"])], k) for c in cases}
        picked = {m: np.array([weights[c] @ np.array([values[m][c][i] for i in sorted(values[m][c])]) for c in cases]) for m in metrics}
        table.append(row_of(f"best-of-{k}", picked, {"renders": float(k), "denoise_steps": float(k * steps),
                                                     "latent_token_steps": float(k * steps * tokens), "decodes": float(k),
                                                     "selector_calls": float(k)}))
    for name, plan in plans.items():
        chosen, costs = zip(*(replay(groups[c], steps, tokens, **plan) for c in cases))
        picked = {m: np.array([values[m][c][k] for c, k in zip(cases, chosen)]) for m in metrics}
        table.append(row_of(name, picked, {key: float(np.mean([cost[key] for cost in costs])) for key in costs[0]}))
    return table


def rank_agreement(candidates: list[dict], steps: int) -> list[dict]:
    """Kendall tau-b between the selector's score of the predicted clean image after each step and
    its score of the final image, over each case's candidates, averaged over cases (NaN-free cases)."""
    from scipy.stats import kendalltau

    groups: dict[str, list[dict]] = {}
    for row in candidates:
        groups.setdefault(row["case_id"], []).append(row)
    out = []
    for step in range(steps - 1):
        taus = []
        for rows in groups.values():
            tau = kendalltau([r["step_scores"][step] for r in rows], [r["select_clip_t"] for r in rows]).statistic
            if not np.isnan(tau):
                taus.append(tau)
        out.append({"step": step, "kendall_tau": float(np.mean(taus)) if taus else float("nan"), "cases": len(taus)})
    return out
