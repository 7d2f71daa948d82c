"""Building to a target, without a model: the per-count targets, the wave sizes, the selection of
exactly the target and the one line of a build that ends short (tasks.publishing.waves; the builds
themselves are in test_target.py)."""
from __future__ import annotations

from collections import Counter

import pytest
import yaml

from data_specs import shipped
from tasks.checks.cost_plan import funnel, plan
from tasks.publishing import waves
from tasks.stages import parse_build_spec


def target_spec(target: dict, **changes):
    data = yaml.safe_load(shipped("tiny.yaml").read_text())
    data.update({"num_source_images": 48, "shard_size": 4, "target": target, **changes})
    return parse_build_spec(data)


def test_a_mix_is_split_into_counts_that_sum_to_the_target():
    assert waves.wanted(target_spec({"samples": 10})) == {waves.ANY: 10}
    assert waves.wanted(target_spec({"samples": 10, "mix": {2: 1, 3: 1, 4: 1}})) == {2: 4, 3: 3, 4: 3}
    assert waves.wanted(target_spec({"samples": 7, "mix": {2: 0.6, 3: 0.4}})) == {2: 4, 3: 3}  # 4.2, 2.8
    assert waves.wanted(target_spec({"samples": 5, "mix": {2: 1, 3: 0}})) == {2: 5}  # a zero share is no key


def test_a_target_the_spec_cannot_publish_is_refused():
    with pytest.raises(ValueError, match=r"target.mix: subject counts \[7\] cannot be published"):
        target_spec({"samples": 10, "mix": {2: 1, 7: 1}})
    with pytest.raises(ValueError, match="target and publish.max_samples"):
        target_spec({"samples": 10}, publish={"max_samples": 5})


def test_the_first_wave_comes_from_the_no_drop_prior_and_never_overshoots_it():
    spec = target_spec({"samples": 10, "mix": {2: 0.6, 3: 0.4}})
    prior = funnel(spec)["per_source_by_count"]
    first = waves.first_wave(spec, prior)
    assert first % spec.shard_size == 0
    # with nothing dropped, the sources just short of the first wave's last shard do not meet the target
    fewer = first - spec.shard_size
    assert any(need > prior[count] * fewer for count, need in waves.wanted(spec).items())
    assert plan(spec)["target"]["first_wave"] == first


def next_wave(spec, sources: int, counts: dict) -> int:
    return waves.next_wave(spec, sources, Counter(counts), funnel(spec)["per_source_by_count"])


def test_later_waves_stop_at_the_target_and_the_ceiling_in_whole_shards():
    spec = target_spec({"samples": 20})
    assert next_wave(spec, 32, {2: 20}) == 32  # met: no more waves
    assert next_wave(spec, 48, {2: 1}) == 48  # at the ceiling
    for cost in (0.0, 16.0, 1000.0):
        costly = target_spec({"samples": 20, "wave_cost": cost})
        for sources, counts in ((8, {2: 3, 3: 2}), (40, {2: 1}), (8, {}), (44, {2: 19})):
            size = next_wave(costly, sources, counts)
            assert sources < size <= costly.num_source_images and (size % 4 == 0 or size == costly.num_source_images)
    # Unreachable within the ceiling: one wave to the ceiling, not a string of small ones.
    assert next_wave(target_spec({"samples": 20, "wave_cost": 4}), 8, {2: 1}) == 48


def test_the_issue_example_no_longer_triples_the_sources_from_one_rare_sample():
    """Tiny spec, a three-way mix whose rarest share (4 subjects) asks for 3: wave 1's 12 sources
    yielded one, and linear extrapolation sent wave 2 to 36 sources (18 would have sufficed)."""
    spec = target_spec({"samples": 10, "mix": {2: 4, 3: 3, 4: 3}}, num_source_images=200)
    assert waves.wanted(spec)[4] == 3
    sizes = [next_wave(target_spec({"samples": 10, "mix": {2: 4, 3: 3, 4: 3}, "wave_cost": cost}, num_source_images=200),
                       12, {2: 6, 3: 4, 4: 1}) for cost in (0, 1, 4, 16, 64, 256)]
    assert sizes == sorted(sizes) and sizes[0] == 16 and sizes[-1] > 36  # a costlier wave: fewer, larger waves
    assert next_wave(spec, 12, {2: 6, 3: 4, 4: 1}) < 36  # the default wave cost (16 sources)


def test_a_wave_is_a_function_of_the_spec_and_the_counts_alone():
    spec = target_spec({"samples": 30, "mix": {2: 1, 3: 1, 4: 1}}, num_source_images=400)
    counts = {2: 7, 3: 4, 4: 1}
    assert len({next_wave(spec, 12, counts) for _ in range(5)}) == 1
    # Costs are in sources: the wave picked is the least expected cost of those offered, smallest of ties.
    costs = waves.wave_costs(spec, 12, Counter(counts), funnel(spec)["per_source_by_count"])
    assert min(costs) == 16 and max(costs) == 400 and next_wave(spec, 12, counts) == min(costs, key=lambda s: (costs[s], s))


def test_the_wave_nears_the_point_estimate_and_costs_less_as_the_posterior_tightens():
    """The same measured rate (1 in 12 sources) and the same shortfall (20), read from more and more
    sources: a rate from one sample takes a cautious step; as evidence grows the wave grows toward
    what the rate says the shortfall needs (240 sources) and its expected cost falls."""
    extras, costs = [], []
    for made, found in ((12, 1), (36, 3), (120, 10), (1200, 100)):
        spec = target_spec({"samples": 20 + found, "mix": {4: 1}, "wave_cost": 64}, num_source_images=8000)
        size = next_wave(spec, made, {4: found})
        extras.append(size - made)
        costs.append(waves.wave_costs(spec, made, Counter({4: found}), funnel(spec)["per_source_by_count"])[size])
    assert extras == sorted(extras) and extras[-1] < 240 and extras[0] < extras[-1] / 1.5
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1] + 1


def test_a_count_nothing_yielded_is_sized_from_the_prior_not_doubled():
    mixed = target_spec({"samples": 10, "mix": {2: 0.5, 3: 0.5}}, num_source_images=400)
    # 8 sources, no 3-subject sample: the posterior (prior 2/3 a source, 1 source's worth) says about 1
    # in 13, so 5 more need about 60 sources; doubling said 16.
    assert 16 < next_wave(mixed, 8, {2: 9}) < 8 + 2 * 60


def test_exactly_the_target_is_chosen_by_lowest_id_per_count():
    spec = target_spec({"samples": 4, "mix": {2: 0.5, 3: 0.5}})
    rows = [{"id": f"s-{i:02d}", "index": i, "num_subjects": n} for i, n in enumerate([2, 3, 2, 2, 4, 3, 3])]
    chosen, rest = waves.choose(spec, rows)
    assert [r["id"] for r in chosen] == ["s-00", "s-01", "s-02", "s-05"]
    assert {r["id"] for r in rest} == {"s-03", "s-04", "s-06"}
    assert waves.sufficed(spec, rows) == 6  # sources 0..5 hold two of each


def test_a_build_short_of_its_target_says_why_in_one_line():
    spec = target_spec({"samples": 30, "mix": {2: 0.5, 3: 0.5}})
    short = waves.short_of_target(spec, Counter({2: 16, 3: 6}), 48)
    line = short.line(spec)
    assert "\n" not in line
    assert line == ("short of the target by 9 3-subject samples: the ceiling of 48 sources (num_source_images) was reached, "
                    "at 3-subject samples 0.125 per source; raise num_source_images to about 120")
    assert waves.short_of_target(spec, Counter({2: 15, 3: 15}), 48) is None


def test_the_card_line_names_the_waves_when_the_build_made_them():
    from tasks.publishing.publish import target_line

    made = {"samples": 10, "mix": {"2": 6, "3": 4}, "waves": [8, 12], "sources_made": 12, "samples_per_source": 0.8333}
    assert target_line(made) == ("- built to a target of 10 samples (per subject count {'2': 6, '3': 4}): 12 sources made in "
                                 "2 waves (sources after each: [8, 12]), 0.8333 published samples per source made\n")
    assert target_line({**made, "waves": [], "sources_made": None}) == "- built to a target of 10 samples (per subject count {'2': 6, '3': 4})\n"
    assert target_line(None) == ""
