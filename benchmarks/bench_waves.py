"""Wave sizing of a build to a target, today's policy against the cost-weighing one, side by side on
the same draws: per mix and seed, the sources made, the fewest that would have sufficed, the waves
and the expected cost in GPU-seconds above an ideal build (overshoot sources x GPU-seconds per
source + extra waves x one wave's model loads).

    python benchmarks/bench_waves.py BUILD_SPEC BUILD_JSON [--seeds 200] [--out waves.json]

BUILD_SPEC: the spec of a finished build without a target (e.g. the tiny spec at 96 sources);
BUILD_JSON: its `music build --json` summary. The yields: each source of that build is one draw of
the samples it can publish by subject count (`tasks.publishing.publish.publishable`: after every stage and
near-duplicate removal), and a simulated build's sources are drawn from them with replacement, one
sequence per seed, which both policies read. The costs: the build's model-seconds per source made
(every stage) and its load seconds (one wave's model loads); the new policy's `target.wave_cost`
is their ratio, as `music plan --bench` figures it. The baseline is `next_wave` as it was before
issue 32 (below, verbatim)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_specs.build import BuildSpec  # noqa: E402
from tasks.checks.clean import current_fingerprints  # noqa: E402
from tasks.checks.cost_plan import funnel  # noqa: E402
from tasks.engine.build_paths import stage_dir  # noqa: E402
from tasks.engine.contract import num_shards  # noqa: E402
from tasks.publishing import waves  # noqa: E402
from tasks.publishing.publish import publishable  # noqa: E402
from tasks.stages import load_build_spec, parse_build_spec  # noqa: E402

SHARD_SIZE = 4
# (name, samples, mix): the issue's three-way mix whose rarest share (4 subjects) asks for 3 samples,
# a rarer one, an even one, and a target without a mix.
MIXES = (("rare 4:3:3 of 10", 10, {2: 4, 3: 3, 4: 3}), ("rarer 6:3:1 of 30", 30, {2: 6, 3: 3, 4: 1}),
         ("even 1:1:1 of 60", 60, {2: 1, 3: 1, 4: 1}), ("any of 80", 80, None))


def baseline_next_wave(spec: BuildSpec, sources: int, subject_counts: Counter) -> int:
    """`tasks.publishing.waves.next_wave` before issue 32: each short count extrapolated linearly from its
    yield so far, twice the sources for a count that yielded none."""
    short = waves.shortfall(spec, subject_counts)
    if not short or sources >= spec.num_source_images:
        return sources
    have = waves.by_key(spec, subject_counts)
    extra = max(math.ceil(missing * sources / have[key]) if have[key] else sources for key, missing in short.items())
    return waves.whole_shards(spec, sources + max(1, extra))


def measured_yields(spec: BuildSpec) -> list[Counter]:
    """Per source of the finished build: the samples it can publish, by subject count."""
    shards = num_shards(spec)
    rows = publishable(spec, stage_dir(spec, "filter", current_fingerprints(spec)["filter"]), shards)
    per_source = [Counter() for _ in range(spec.num_source_images)]
    for row in rows:
        per_source[row["index"]][row["num_subjects"]] += 1
    return per_source


def simulate(spec: BuildSpec, draws: list[Counter], policy) -> dict:
    """One build to `spec`'s target over the sources `draws`: the waves and the fewest sufficient."""
    prior = funnel(spec)["per_source_by_count"]
    sources, made = waves.first_wave(spec, prior), []
    while True:
        made.append(sources)
        counts = sum(draws[:sources], Counter())
        following = policy(spec, sources, counts, prior)
        if following == sources:
            break
        sources = following
    have: Counter = Counter()
    need = waves.wanted(spec)
    sufficed = None
    for index, draw in enumerate(draws):
        have += waves.by_key(spec, draw)
        if all(have[key] >= count for key, count in need.items()):
            sufficed = index + 1
            break
    return {"made": made[-1], "waves": len(made), "sufficed": sufficed, "short": bool(waves.shortfall(spec, counts))}


def compare(built: BuildSpec, yields: list[Counter], name: str, samples: int, mix: dict | None, wave_cost: float,
            per_source: float, args, old_policy) -> dict:
    """Both policies on the same `args.seeds` draws of `args.ceiling` sources; prints a line each."""
    target = {"samples": samples, "mix": mix, "wave_cost": wave_cost}
    spec = parse_build_spec({**built.model_dump(mode="json"), "num_source_images": args.ceiling, "shard_size": SHARD_SIZE,
                             "target": target})
    row = {"mix": name, "samples": samples, "wanted": waves.wanted(spec), "policies": {}}
    for label, policy in (("today", old_policy), ("new", waves.next_wave)):
        runs = []
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            draws = [yields[i] for i in rng.integers(0, len(yields), args.ceiling)]
            run = simulate(spec, draws, policy)
            run["cost"] = ((run["made"] - run["sufficed"]) + (run["waves"] - 1) * wave_cost) * per_source
            runs.append(run)
        ratio = [r["made"] / r["sufficed"] for r in runs]
        stats = {"made": float(np.mean([r["made"] for r in runs])), "sufficed": float(np.mean([r["sufficed"] for r in runs])),
                 "made_over_sufficed": float(np.mean(ratio)), "max_ratio": float(np.max(ratio)),
                 "waves": float(np.mean([r["waves"] for r in runs])), "cost": float(np.mean([r["cost"] for r in runs])),
                 "short": sum(r["short"] for r in runs), "first_seeds": runs[:5]}
        row["policies"][label] = stats
        print(f"{name:20s} {label:8s} {stats['made']:7.1f} {stats['sufficed']:8.1f} {stats['made_over_sufficed']:9.2f} "
              f"{stats['max_ratio']:6.2f} {stats['waves']:6.2f} {stats['cost']:11.2f} {stats['short']:5d}")
    today, new = row["policies"]["today"]["cost"], row["policies"]["new"]["cost"]
    print(f"{'':20s} new / today expected cost: {new / today:.2f}" if today else f"{'':20s} today's cost 0")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("summary", type=Path)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--ceiling", type=int, default=2000)
    parser.add_argument("--wave-costs", type=float, nargs="*", default=[16.0, 64.0],
                        help="more wave costs (sources' worth of GPU work per wave) to run besides the measured one, "
                             "as a real model's loads weigh more than the tiny zoo's")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    # 1. What one source yields and what the GPU work costs, from the finished build.
    built = load_build_spec(args.spec)
    yields = measured_yields(built)
    summary = json.loads(args.summary.read_text())
    per_source = sum(s["model_seconds"] for s in summary["stages"]) / built.num_source_images
    per_wave = sum(s["load_seconds"] for s in summary["stages"])
    wave_cost = per_wave / per_source
    rates = sum(yields, Counter())
    print(f"{len(yields)} sources measured: publishable samples by subject count {dict(sorted(rates.items()))}; "
          f"{per_source:.4f} model-s per source, {per_wave:.2f} load s per wave: target.wave_cost {wave_cost:.1f} sources")

    # 2. Both policies on the same draws, per wave cost, mix and seed.
    results = {"per_source_seconds": per_source, "measured_wave_cost": wave_cost, "runs": []}
    old_policy = lambda spec, sources, counts, prior: baseline_next_wave(spec, sources, counts)  # noqa: E731
    for cost in [wave_cost, *args.wave_costs]:
        print(f"\ntarget.wave_cost {cost:.1f} sources = {cost * per_source:.2f} GPU-s a wave"
              f"{' (measured)' if cost == wave_cost else ''}")
        print(f"{'mix':20s} {'policy':8s} {'made':>7s} {'sufficed':>8s} {'made/suff':>9s} {'max':>6s} {'waves':>6s} "
              f"{'cost GPU-s':>11s} {'short':>5s}")
        for name, samples, mix in MIXES:
            row = compare(built, yields, name, samples, mix, cost, per_source, args, old_policy)
            row["wave_cost"] = cost
            results["runs"].append(row)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
