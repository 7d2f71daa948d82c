"""Each stage's plain function on a shard file, chained over a 6-sample tiny spec (no Prefect; the
shared `chain` fixture of conftest.py)."""
from __future__ import annotations

import json

import numpy as np

from music_model.media import masks as rle
from music_model.subjects.decimate import mentioned
from tasks.engine.build_paths import stage_dir
from tasks.engine.contract import fingerprint, read_rows, root_fingerprint, run_shard
from tasks.engine.image_store import image_store
from tasks.stages import compose, detect, rerender, synthesize


def test_every_row_is_kept_or_dropped_with_a_reason(chain):
    _, out = chain
    for stage, (summary, rows, dropped, _) in out.items():
        assert summary["rows_out"] == len(rows)
        assert all(d["reason"] and d["stage"] == stage for d in dropped)
        if stage != "decimate":
            assert summary["rows_in"] == len(rows) + len(dropped), stage
    assert out["filter"][1], "the tiny chain must carry data to the end"


def test_compose_samples_within_the_spec(chain):
    spec, out = chain
    rows = out["compose"][1]
    assert [r["index"] for r in rows] == list(range(6))
    for row in rows:
        assert len(row["categories"]) in spec.subject_counts and len(set(row["categories"])) == len(row["categories"])
        assert 0 < len(row["caption"]) <= spec.compose.max_caption_chars


def test_compose_is_deterministic(chain, tmp_path):
    spec, out = chain
    again = spec.model_copy(update={"output_root": str(tmp_path)})
    fp = fingerprint(compose.STAGE, again, root_fingerprint(again))
    run_shard(compose.STAGE, again, 0, fp, None)
    assert read_rows(stage_dir(again, "compose", fp) / "part-00000.parquet") == out["compose"][1]


def test_synthesize_detect_verify(chain):
    spec, out = chain
    for row in out["synthesize"][1]:
        assert image_store(spec).open(row["image"]).size == (spec.synthesize.width, spec.synthesize.height)
    for stage in ("detect", "verify"):
        for row in out[stage][1]:
            assert len(row["subjects"]) >= spec.verify.min_subjects
            assert [s["id"] for s in row["subjects"]] == list(range(1, len(row["subjects"]) + 1))
            for s in row["subjects"]:
                x0, y0, x1, y1 = s["box"]
                assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1
                assert (x1 - x0) * (y1 - y0) >= spec.detect.min_box_area - 1e-6
                assert s["category"] in row["categories"]


def test_rerender_keeps_exactly_the_references_within_the_dino_bounds(chain, tmp_path):
    spec, out = chain
    # The chain's tiny bounds (-1, 1) keep every reference; a rerun has the same seeds, so the same scores.
    scores = {(r["index"], s["category"]): s["reference_dino"] for r in out["rerender"][1] for s in r["subjects"]}
    assert len(scores) == sum(len(r["subjects"]) for r in out["verify"][1]) >= 4
    for row in out["rerender"][1]:
        for s in row["subjects"]:
            assert max(image_store(spec).open(s["reference"]).size) == spec.rerender.size  # the crop's aspect: test_data_quality
    ordered = sorted(scores.values())
    low, high = ordered[len(ordered) // 4], ordered[3 * len(ordered) // 4]
    assert ordered[0] < low < high < ordered[-1], ordered
    bounds = spec.rerender.model_copy(update={"min_dino": low, "max_dino": high})
    strict = spec.model_copy(update={"output_root": str(tmp_path), "rerender": bounds})
    fp = fingerprint(rerender.STAGE, strict, "strict")
    run_shard(rerender.STAGE, strict, 0, fp, out["verify"][3])
    kept = {r["index"]: r for r in read_rows(stage_dir(strict, "rerender", fp) / "part-00000.parquet")}
    dropped = {d["index"]: d for d in read_rows(stage_dir(strict, "rerender", fp) / "part-00000.dropped.parquet")}
    for row in out["verify"][1]:
        inside = [s["category"] for s in row["subjects"] if low <= scores[(row["index"], s["category"])] <= high]
        if len(inside) >= spec.verify.min_subjects:
            subjects = kept[row["index"]]["subjects"]
            assert [s["category"] for s in subjects] == inside and [s["id"] for s in subjects] == list(range(1, len(inside) + 1))
            assert all(s["reference_dino"] == scores[(row["index"], s["category"])] for s in subjects)
        else:
            assert row["index"] not in kept and dropped[row["index"]]["reason"] == "too_few_references"
    assert kept and dropped, "the bounds must keep some samples and drop others"


def test_annotate_names_every_subject(chain):
    _, out = chain
    for row in out["annotate"][1]:
        ids = {s["id"] for s in row["subjects"]}
        assert mentioned(row["instruction"]) == ids
        cot = json.loads(row["cot"])
        assert [e["id"] for e in cot["subjects"]] == sorted(ids)
        assert all(mentioned(r) <= ids for r in cot["relations"])


def test_layout_masks_and_grid(chain):
    _, out = chain
    for row in out["layout"][1]:
        ids = [s["id"] for s in row["subjects"]]
        assert len(row["layout"]) == 64 and set(row["layout"]) <= {0, *ids}
        assert all(i in row["layout"] for i in ids)
        for s in row["subjects"]:
            assert rle.decode(s["mask"]).shape == (row["height"], row["width"])
            assert s["region"] in ("mask", "box") and 0 < s["area"] <= 1


def test_decimate_and_filter(chain):
    _, out = chain
    sources = out["layout"][1]
    assert len(out["decimate"][1]) == sum(len(r["subjects"]) - 1 for r in sources)
    for row in out["filter"][1]:
        assert abs(np.linalg.norm(row["clip_embedding"]) - 1) < 1e-4


def test_detect_drops_with_reason_when_no_box_is_big_enough(chain, tmp_path):
    spec, out = chain
    strict = spec.model_copy(update={"output_root": str(tmp_path), "detect": spec.detect.model_copy(update={"min_box_area": 0.99})})
    upstream = fingerprint(synthesize.STAGE, spec, fingerprint(compose.STAGE, spec, root_fingerprint(spec)))
    fp = fingerprint(detect.STAGE, strict, "strict")
    summary = run_shard(detect.STAGE, strict, 0, fp, stage_dir(spec, "synthesize", upstream))
    assert summary["rows_out"] == 0 and summary["dropped"] == {"too_few_detected": 6}
