"""Per-sample quality scores in the published set (the columns, their ranges, a one-line `datasets`
filter on them, the near-duplicate score's definition), rerender's scores table of every candidate,
and `music calibrate` over the session's tiny build.

Prefect and the flows are imported inside the tests (conftest starts the server after collection)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

SCORE_COLUMNS = ("detector_scores", "verify_confidences", "reference_dino", "mask_clip_margins")


def test_near_duplicate_clip_is_the_highest_cosine_to_a_lower_published_id():
    from tasks.publishing.publish import nearest_earlier

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(7, 16)).astype(np.float32)
    vectors[4] = vectors[1] + 0.05 * vectors[4]  # s4 a near copy of s1, s6 of s4 (and so of s1)
    vectors[6] = vectors[4] + 0.05 * vectors[6]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    embeddings = {f"s{i}": vectors[i] for i in range(7)}
    for block in (1, 3, 1024):  # blocked or not, the same values
        nearest = nearest_earlier(embeddings, [f"s{i}" for i in (6, 0, 1, 2, 3, 4, 5, 4)], block=block)
        assert list(nearest) == [f"s{i}" for i in range(7)] and nearest["s0"] == -1.0
        for i in range(1, 7):
            assert math.isclose(nearest[f"s{i}"], max(float(vectors[i] @ vectors[j]) for j in range(i)), abs_tol=1e-5)
    # Keeping the rows under t leaves no pair at t or above, and keeps the first of each group.
    kept = [s for s, score in nearest.items() if score < 0.9]
    assert "s1" in kept and "s4" not in kept and "s6" not in kept
    assert all(float(embeddings[a] @ embeddings[b]) < 0.9 for a in kept for b in kept if a < b)


def test_rerender_scores_every_candidate_kept_or_rejected(chain, tmp_path):
    from tasks.engine.build_paths import stage_dir
    from tasks.engine.contract import fingerprint, read_rows, run_shard
    from tasks.engine.markers import scores_path
    from tasks.stages import rerender

    spec, out = chain
    candidates = {(r["index"], s["id"]): s["category"] for r in out["verify"][1] for s in r["subjects"]}
    table = read_rows(scores_path(out["rerender"][3], 0))
    assert {(r["index"], r["subject"]): r["category"] for r in table} == candidates and len(table) == len(candidates)
    kept = {(r["index"], s["category"]): s["reference_dino"] for r in out["rerender"][1] for s in r["subjects"]}
    assert all(r["passed"] and r["stage"] == "rerender" and r["name"] == "reference_dino" for r in table)  # tiny bounds keep all
    assert all(math.isclose(r["value"], kept[(r["index"], r["category"])], rel_tol=1e-6) for r in table)

    # Bounds that reject some: the rejected keep their score in the table, and only there.
    ordered = sorted(r["value"] for r in table)
    low, high = ordered[len(ordered) // 4], ordered[3 * len(ordered) // 4]
    strict = spec.model_copy(update={"output_root": str(tmp_path),
                                     "rerender": spec.rerender.model_copy(update={"min_dino": low, "max_dino": high})})
    fp = fingerprint(rerender.STAGE, strict, "strict")
    summary = run_shard(rerender.STAGE, strict, 0, fp, out["verify"][3])
    assert "part-00000.scores.parquet" in summary["outputs"]  # the marker vouches for it
    rows = read_rows(scores_path(stage_dir(strict, "rerender", fp), 0))
    assert np.allclose(sorted(r["value"] for r in rows), ordered)  # the same seeds: the same scores
    assert all(r["passed"] == (low <= r["value"] <= high) for r in rows) and not all(r["passed"] for r in rows)


def test_vary_names_its_variants_shared_stages_and_a_bad_value_in_one_line():
    from tasks.checks.calibrate import calibration_spec, parse_vary, shared_stages, variant_spec
    from tasks.stages import load_build_spec

    assert parse_vary("rerender.render_size=512, 1024") == ("rerender.render_size", [512, 1024])
    for bad in ("rerender.render_size=512", "render_size=64,128", "rerender.render_size", "rerender.render_size=64,"):
        with pytest.raises(ValueError, match=r"expected section\.field=a,b"):
            parse_vary(bad)
    spec = calibration_spec(load_build_spec("tiny.yaml"), 8)
    with pytest.raises(ValueError, match="the spec has no field rerender.render_sise"):
        variant_spec(spec, "rerender.render_sise", 64)
    with pytest.raises(ValueError, match="rerender.render_size") as error:
        variant_spec(spec, "rerender.render_size", 8)  # under its bound of 16
    assert "\n" not in str(error.value)
    sizes = [variant_spec(spec, "rerender.render_size", v) for v in (64, 128)]
    assert sizes[1].rerender.render_size == 128 and sizes[1].num_source_images == 8
    assert shared_stages(sizes) == ["compose", "synthesize", "detect", "verify"]
    assert shared_stages([variant_spec(spec, "synthesize.width", v) for v in (64, 128)]) == ["compose"]


@pytest.mark.prefect
def test_published_set_carries_quality_scores_a_user_filters_on(tiny_build):
    import datasets

    from tasks.checks.clean import current_fingerprints
    from tasks.engine.build_paths import stage_dir
    from tasks.engine.contract import num_shards
    from tasks.publishing.publish import read_filter_index
    from tasks.stages import load_build_spec

    spec = load_build_spec(tiny_build["spec"])
    dataset = Path(tiny_build["result"]["dataset"])
    loaded = datasets.load_dataset("parquet", data_files=str(dataset / "data" / "*.parquet"), split="train")
    assert set(SCORE_COLUMNS) | {"near_duplicate_clip"} <= set(loaded.column_names)
    rows = loaded.select_columns(["source_id", "subject_ids", "regions", *SCORE_COLUMNS, "near_duplicate_clip"]).to_list()
    for row in rows:
        assert all(len(row[column]) == len(row["subject_ids"]) for column in SCORE_COLUMNS), row
        assert all(spec.detect.box_threshold <= v <= 1 for v in row["detector_scores"]), row
        assert all(spec.verify.min_confidence <= v <= 1 for v in row["verify_confidences"]), row
        assert all(spec.rerender.min_dino <= v <= spec.rerender.max_dino for v in row["reference_dino"]), row
        assert all(-2 <= v <= 2 for v in row["mask_clip_margins"]), row
        assert all(v > 0 for v, region in zip(row["mask_clip_margins"], row["regions"]) if region == "mask"), row
        assert -1 <= row["near_duplicate_clip"] < spec.filter.near_duplicate_clip

    # near_duplicate_clip: the highest CLIP cosine to a published source of lower ID (-1.0 for the first).
    index = read_filter_index(stage_dir(spec, "filter", current_fingerprints(spec)["filter"]), num_shards(spec))
    sources = sorted({row["source_id"] for row in rows})
    expected = {s: max([float(index.embeddings[s] @ index.embeddings[o]) for o in sources[:i]], default=-1.0)
                for i, s in enumerate(sources)}
    assert all(math.isclose(row["near_duplicate_clip"], expected[row["source_id"]], abs_tol=1e-5) for row in rows)
    assert len(sources) > 1

    # The card's one-line filter keeps exactly the rows whose every subject reaches the bound.
    bound = float(np.median([min(row["verify_confidences"]) for row in rows]))
    kept = loaded.filter(lambda r: min(r["verify_confidences"]) >= bound)
    assert 0 < len(kept) < len(loaded) or len({min(r["verify_confidences"]) for r in rows}) == 1
    assert kept["id"] == [i for i, row in zip(loaded["id"], rows) if min(row["verify_confidences"]) >= bound]
    card = (dataset / "README.md").read_text()
    assert "## Quality scores" in card and 'ds.filter(lambda r: min(r["verify_confidences"]) >= 0.8)' in card


@pytest.mark.prefect
def test_calibrate_prints_keep_rates_and_every_threshold_with_a_plot_per_variant(tiny_build, tmp_path):
    """`music calibrate` of the tiny spec at 8 sources, varying rerender.render_size. Its folder starts
    as a copy of the session's tiny build: the calibration samples are the full build's first 8
    sources, so the first variant (the spec's own 64) runs publish alone, and the second (128) runs
    only rerender and the stages after it: the stages before rerender are shared, not made twice."""
    data = yaml.safe_load(tiny_build["spec"].read_text()) | {"output_root": str(tmp_path / "out")}
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(data))
    folder = tmp_path / "out" / "tiny-calibrate-8" / "tiny"
    shutil.copytree(tiny_build["dir"], folder)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "calibrate", str(spec), "--sources", "8",
                           "--vary", "rerender.render_size=64,128"], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "2 variants of rerender.render_size: 64, 128; stages made once and shared: compose, synthesize, detect, verify" in out
    assert f"Calibration build of 8 sources (rerender.render_size=64): {folder}" in out
    built = [line for line in out.splitlines() if line.startswith("Built ")]
    assert len(built) == 2 and "(1 task runs)" in built[0], out  # every stage shard reused from the full build's
    assert "(6 task runs)" in built[1], out  # rerender, annotate, layout, decimate, filter on the one shard, then publish
    assert not (tmp_path / "out" / "tiny").exists()  # the full build's folder is never made or touched
    table = out[out.index("Variants of rerender.render_size"):].splitlines()
    assert "rerender" in table[1] and [line.split()[0] for line in table[2:4]] == ["64", "128"]

    for value in (64, 128):
        where = folder / "calibrate" / f"rerender.render_size={value}"
        report = json.loads((where / "calibration.json").read_text())
        assert report["variant"] == f"rerender.render_size={value}"
        assert [r["stage"] for r in report["keep_rates"]][-1] == "publish" and report["keep_rates"][0]["in"] == 8
        rows = {r["threshold"]: r for r in report["thresholds"]}
        assert set(rows) == {"detect.box_threshold", "verify.min_confidence", "rerender.min_dino", "rerender.max_dino",
                             "filter.near_duplicate_clip"}
        for name, row in rows.items():
            assert row["count"] > 0 and row["min"] <= row["p5"] <= row["p25"] <= row["median"] <= row["p75"] <= row["p95"] <= row["max"]
            assert 0 <= row["dropped"] <= 1 and row["value"] is not None, row
            assert f"\n  {name} " in out
        assert rows["rerender.min_dino"]["values"] == "every candidate"
        published = json.loads((folder / "dataset" / "stats.json").read_text())
        assert rows["filter.near_duplicate_clip"]["count"] == published["sources"] - 1  # tiny: no source is a near duplicate

        markdown = (where / "calibration.md").read_text()
        assert markdown.startswith(f"# Calibration of tiny (rerender.render_size={value}): 8 sources")
        assert all(f"| `{name}` |" in markdown for name in rows)
        png = where / "thresholds.png"
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 600 and image.height > 600
        for line in (f"table: {where / 'calibration.md'}", f"json: {where / 'calibration.json'}",
                     f"plot: {png}", f"preview sheets: {folder / 'dataset' / 'preview'} ({len(published['preview'])} sheets)"):
            assert line in out, line
