"""Build to a target (`BuildSpec.target`): how many sources each wave makes, what the sources made
so far can publish, and which samples are published. No Prefect, no model.

Sources are addressed by index, so waves are prefixes of one sequence: wave 1 makes sources
[0, s1), wave 2 [s1, s2), and so on, each ending on a shard boundary (or at the ceiling,
`num_source_images`). Wave 1 is sized from the plan's no-drop prior, which never overestimates what
a source yields, so it never makes more than the target needs. Every later wave weighs two costs
(`next_wave`): the sources it makes beyond the fewest that would have sufficed, and
`target.wave_cost` (in sources) for each further wave its shortfall would need. Each subject
count's yield per source is a Gamma posterior (the no-drop prior as one source's worth of
evidence, then every source made so far), so a rate read from a handful of samples sizes the
wave cautiously and a well-measured one sizes it tightly. Every figure is a function of the spec
and of the data made, so a spec gives the same waves on any machine, a killed build resumes into
the same wave, and a raised target (or ceiling) only adds sources. Published: per subject count
the samples of the lowest IDs (the earliest sources) the target asks for."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy.stats import nbinom

from data_specs.build import BuildSpec

ANY = 0  # the key of a target without a mix: samples of any subject count
PRIOR_SOURCES = 1.0  # the no-drop prior's weight in the yield posterior, in sources: an upper bound, so weak


def wanted(spec: BuildSpec) -> dict[int, int]:
    """Samples to publish per subject count (`ANY` without a mix): the mix's shares of the target,
    rounded by largest remainder so that they sum to it exactly."""
    target = spec.target
    if target.mix is None:
        return {ANY: target.samples}
    total = sum(target.mix.values())
    exact = {count: target.samples * share / total for count, share in target.mix.items()}
    counts = {count: math.floor(value) for count, value in exact.items()}
    by_remainder = sorted(exact, key=lambda count: (-(exact[count] - counts[count]), count))
    for count in by_remainder[: target.samples - sum(counts.values())]:
        counts[count] += 1
    return counts


def by_key(spec: BuildSpec, subject_counts: Counter) -> Counter:
    """Publishable samples by subject count, folded onto `wanted`'s keys."""
    if spec.target.mix is None:
        return Counter({ANY: sum(subject_counts.values())})
    return Counter({count: subject_counts[count] for count in spec.target.mix})


def shortfall(spec: BuildSpec, subject_counts: Counter) -> dict[int, int]:
    have = by_key(spec, subject_counts)
    return {key: need - have[key] for key, need in wanted(spec).items() if have[key] < need}


def whole_shards(spec: BuildSpec, sources: int) -> int:
    """`sources` rounded up to a shard boundary, at most the ceiling."""
    return min(spec.num_source_images, -(-sources // spec.shard_size) * spec.shard_size)


def first_wave(spec: BuildSpec, prior: dict[int, float]) -> int:
    """Sources for the target at `prior` samples per source by subject count (the no-drop funnel)."""
    per_source = by_key(spec, Counter(prior))
    needed = max(math.ceil(need / per_source[key]) if per_source[key] > 0 else spec.num_source_images
                 for key, need in wanted(spec).items())
    return whole_shards(spec, max(1, needed))


def posterior(spec: BuildSpec, sources: int, subject_counts: Counter, prior: dict[int, float]) -> dict[int, tuple[float, float]]:
    """Per key of `wanted`: the Gamma posterior (shape, rate) of its samples per source, from the
    no-drop `prior` (`PRIOR_SOURCES` sources' worth) and the `sources` made so far, which can
    publish `subject_counts`. Its mean is (prior + samples) / (`PRIOR_SOURCES` + sources)."""
    per_source, have = by_key(spec, Counter(prior)), by_key(spec, subject_counts)
    return {key: (PRIOR_SOURCES * per_source[key] + have[key], PRIOR_SOURCES + sources) for key in wanted(spec)}


def met_by(short: dict[int, int], belief: dict[int, tuple[float, float]], horizon: int) -> np.ndarray:
    """P(the shortfall is met within t more sources) for t = 0..horizon: per key, the chance that the
    samples of t sources, Gamma-Poisson (negative binomial: shape, rate / (rate + t)), reach what it
    lacks; keys taken as independent."""
    t = np.arange(horizon + 1, dtype=np.float64)
    met = np.ones(horizon + 1)
    for key, missing in short.items():
        shape, rate = belief[key]
        if shape <= 0:  # no evidence that this count is ever yielded: never met
            return np.zeros(horizon + 1)
        met *= nbinom.sf(missing - 1, shape, rate / (rate + t))
    return met


def wave_costs(spec: BuildSpec, sources: int, subject_counts: Counter, prior: dict[int, float]) -> dict[int, float]:
    """Expected cost, in sources' worth of GPU work, of each size the next wave may take (the
    sources made after it, whole shards up to the ceiling): the sources it makes beyond those
    the target turns out to need, plus `target.wave_cost` if the target is still short after it
    (a miss, counted as one more wave; none at the ceiling, where the build stops)."""
    short = shortfall(spec, subject_counts)
    horizon = spec.num_source_images - sources
    met = met_by(short, posterior(spec, sources, subject_counts, prior), horizon)
    overshoot = np.concatenate([[0.0], np.cumsum(met[:-1])])  # E[(x - T)+] = sum over t < x of P(T <= t)
    sizes = sorted({whole_shards(spec, sources + extra) for extra in range(1, horizon + 1)})
    # At the ceiling a miss costs no wave: the build ends there, short.
    return {size: float(overshoot[size - sources] + (spec.target.wave_cost * (1.0 - met[size - sources])
                                                     if size < spec.num_source_images else 0.0)) for size in sizes}


def next_wave(spec: BuildSpec, sources: int, subject_counts: Counter, prior: dict[int, float]) -> int:
    """The sources made after the next wave, from the yields of the `sources` made so far
    (`subject_counts`: what they can publish) and the no-drop `prior` per source by subject count;
    `sources` itself when the target is met or the ceiling reached. The size of least expected
    cost (`wave_costs`), the smallest of equal ones."""
    if not shortfall(spec, subject_counts) or sources >= spec.num_source_images:
        return sources
    costs = wave_costs(spec, sources, subject_counts, prior)
    return min(costs, key=lambda size: (costs[size], size))


def choose(spec: BuildSpec, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(published, left over): per key of `wanted`, the rows of the lowest IDs it asks for; rows of a
    subject count the mix does not name are left over."""
    left = {key: need for key, need in wanted(spec).items()}
    chosen, rest = [], []
    for row in sorted(rows, key=lambda r: r["id"]):
        key = ANY if spec.target.mix is None else row["num_subjects"]
        if left.get(key, 0) > 0:
            left[key] -= 1
            chosen.append(row)
        else:
            rest.append(row)
    return chosen, rest


def sufficed(spec: BuildSpec, rows: list[dict]) -> int | None:
    """The fewest sources (a prefix of the sequence) whose publishable rows meet the target, known
    only afterwards; None when the rows made do not meet it."""
    need = wanted(spec)
    have: Counter = Counter()
    for row in sorted(rows, key=lambda r: r["index"]):
        have[ANY if spec.target.mix is None else row["num_subjects"]] += 1
        if all(have[key] >= count for key, count in need.items()):
            return row["index"] + 1
    return None


@dataclass(frozen=True)
class Short:
    """A build that reached its ceiling short of its target: the one line that says so."""

    published: dict[int, int]
    missing: dict[int, int]
    sources: int
    yields: dict[int, float]

    def line(self, spec: BuildSpec) -> str:
        def name(key: int) -> str:
            return "samples" if key == ANY else f"{key}-subject samples"

        missing = ", ".join(f"{count} {name(key)}" for key, count in self.missing.items())
        yields = ", ".join(f"{name(key)} {self.yields.get(key, 0.0):.3f}" for key in self.missing)
        need = wanted(spec)
        if all(self.yields.get(key) for key in self.missing):
            advice = f"raise num_source_images to about {max(math.ceil(need[key] / self.yields[key]) for key in self.missing)}"
        else:
            advice = "a subject count yielded nothing: lower its share in target.mix or raise its weight in subject_counts"
        return (f"short of the target by {missing}: the ceiling of {self.sources} sources (num_source_images) was reached, "
                f"at {yields} per source; {advice}")


def short_of_target(spec: BuildSpec, subject_counts: Counter, sources: int) -> Short | None:
    """Why a build that made `sources` sources falls short of its target, or None when it does not."""
    short = shortfall(spec, subject_counts)
    if not short:
        return None
    have = by_key(spec, subject_counts)
    return Short({key: have[key] for key in wanted(spec)}, short, sources,
                 {key: have[key] / sources for key in wanted(spec)} if sources else {})
