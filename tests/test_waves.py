"""Building to a target, without a model: the per-count targets, the wave sizes, the selection of
exactly the target and the one line of a build that ends short (tasks.waves; the builds
themselves are in test_target.py)."""
from __future__ import annotations

from collections import Counter

import pytest
import yaml

from data_specs import shipped
from data_specs.build import parse_build_spec
from tasks import waves
from tasks.cost_plan import funnel, plan


def target_spec(target: dict, **changes):
    data = yaml.safe_load(shipped("tiny.yaml").read_text())
    data.update(num_source_images=48, shard_size=4, target=target, **changes)
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


def test_later_waves_come_from_the_measured_yields():
    spec = target_spec({"samples": 20})
    # 8 sources gave 5 samples: 15 more at 5/8 a source is 24 sources more, so 32 in all
    assert waves.next_wave(spec, 8, Counter({2: 3, 3: 2})) == 32
    assert waves.next_wave(spec, 32, Counter({2: 20})) == 32  # met: no more waves
    assert waves.next_wave(spec, 40, Counter({2: 1})) == 48  # the ceiling
    assert waves.next_wave(spec, 48, Counter({2: 1})) == 48
    mixed = target_spec({"samples": 10, "mix": {2: 0.5, 3: 0.5}})
    assert waves.next_wave(mixed, 8, Counter({2: 9})) == 16  # no 3-subject sample yet: twice the sources


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
    from tasks.publish import target_line

    made = {"samples": 10, "mix": {"2": 6, "3": 4}, "waves": [8, 12], "sources_made": 12, "samples_per_source": 0.8333}
    assert target_line(made) == ("- built to a target of 10 samples (per subject count {'2': 6, '3': 4}): 12 sources made in "
                                 "2 waves (sources after each: [8, 12]), 0.8333 published samples per source made\n")
    assert target_line({**made, "waves": [], "sources_made": None}) == "- built to a target of 10 samples (per subject count {'2': 6, '3': 4})\n"
    assert target_line(None) == ""
