"""Each stage's plain function on a shard file, chained over a 6-sample tiny spec (no Prefect)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from data_specs import shipped
from data_specs.build import parse_build_spec
from data_specs.schemas import WORK
from music_model import masks as rle
from music_model.decimate import mentioned
from music_model.images import from_struct
from tasks import annotate, compose, decimate, detect, filter, layout, rerender, synthesize, verify
from tasks.engine import fingerprint, read_rows, root_fingerprint, run_shard, stage_dir

ORDER = [compose, synthesize, detect, verify, rerender, annotate, layout, decimate, filter]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Run every stage on shard 0; returns spec and {stage: (summary, rows, dropped rows)}."""
    data = yaml.safe_load(shipped("tiny.yaml").read_text())
    data.update(name="stages", num_source_images=6, shard_size=6, output_root=str(tmp_path_factory.mktemp("stages")))
    spec = parse_build_spec(data)
    upstream, upstream_dir, out = root_fingerprint(spec), None, {}
    for module in ORDER:
        fp = fingerprint(module.STAGE, spec, upstream)
        summary = run_shard(module.STAGE, spec, 0, fp, upstream_dir)
        folder = stage_dir(spec, module.STAGE.name, fp)
        assert pq.read_schema(folder / "part-00000.parquet").equals(WORK, check_metadata=False)
        dropped = read_rows(folder / "part-00000.dropped.parquet")
        out[module.STAGE.name] = (summary, read_rows(folder / "part-00000.parquet"), dropped)
        upstream, upstream_dir = fp, folder
    return spec, out


def test_every_row_is_kept_or_dropped_with_a_reason(chain):
    _, out = chain
    for stage, (summary, rows, dropped) in out.items():
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
        assert from_struct(row["image"]).size == (spec.synthesize.width, spec.synthesize.height)
    for stage in ("detect", "verify"):
        for row in out[stage][1]:
            assert len(row["subjects"]) >= spec.verify.min_subjects
            assert [s["id"] for s in row["subjects"]] == list(range(1, len(row["subjects"]) + 1))
            for s in row["subjects"]:
                x0, y0, x1, y1 = s["box"]
                assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1
                assert (x1 - x0) * (y1 - y0) >= spec.detect.min_box_area - 1e-6
                assert s["category"] in row["categories"]


def test_rerender_references(chain):
    spec, out = chain
    for row in out["rerender"][1]:
        for s in row["subjects"]:
            assert from_struct(s["reference"]).size == (spec.rerender.size, spec.rerender.size)
            assert spec.rerender.min_dino <= s["reference_dino"] <= spec.rerender.max_dino


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
