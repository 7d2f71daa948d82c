"""The scoring protocol pinned on real DreamBench photos and the tiny zoo: an image against itself is
1.0, the preprocessing is Resize-bicubic + CenterCrop to 1e-6, CLIP-T is a raw cosine, batched
scores equal a per-pair loop; bootstrap intervals; Pass@N selection; multi-subject scores on
synthetic cases made from DreamBench photos."""
from __future__ import annotations

import io
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data_specs.eval import CASES, GroundingParams
from music_model.media.preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from music_model.roles import load_role
from music_model.scoring.metrics import (SCALE, Scorer, UnreadableImage, bootstrap_estimate, cosine_matrix, decode_image, pair_means,
                                 rowwise_cosine)
from music_model.scoring.multisubject import CasesError, _assign, by_subject_count, decode_case, read_cases_table, score_cases
from music_model.scoring.passn import passn_curve, selection_weights

COMMON = {"device": "cpu", "dtype": "float32", "batch_size": 4}
DINO = {"role": "dino", "backend": "transformers", "model": "zoo:dino_vits16", **COMMON}
CLIPS = {
    "transformers": {"role": "clip", "backend": "transformers", "model": "zoo:clip_b32", **COMMON},
    "open_clip": {"role": "clip", "backend": "open_clip", "model": "zoo:open_clip_b32", **COMMON},
}
SELECT = {"role": "clip", "backend": "transformers", "model": "zoo:clip_l14", **COMMON}
DETECTOR = {"role": "detector", "backend": "transformers", "model": "zoo:grounding_dino", **COMMON}


@pytest.fixture(scope="module")
def photos(dreambench_dir) -> dict[str, Image.Image]:
    return {s: decode_image(dreambench_dir / s / "00.jpg") for s in ("dog", "backpack", "teapot", "cat", "vase", "dog6")}


@pytest.fixture(scope="module", params=sorted(CLIPS))
def scorer(request) -> Scorer:
    return Scorer.from_specs(DINO, CLIPS[request.param], SELECT)


# --- protocol -------------------------------------------------------------------------------------


def test_an_image_against_itself_scores_one(scorer, photos):
    images = list(photos.values())[:3]
    emb = scorer.embed_images(images)
    for matrix in (emb.dino, emb.clip):
        assert matrix.dtype == np.float32
        np.testing.assert_allclose(np.diag(cosine_matrix(matrix, matrix)), 1.0, atol=1e-6)
        np.testing.assert_allclose(pair_means(matrix[:1], matrix[:1]), [1.0], atol=1e-6)
    different = cosine_matrix(emb.dino, emb.dino)[0, 1]
    assert different < 1 - 1e-4  # and two different photos do not


def hand_computed(photo: Image.Image, resize: int, crop: int, mean, std) -> np.ndarray:
    """Resize the shorter side bicubic (longer side truncated, as torchvision), crop the centre
    (offsets rounded half to even, as torchvision), scale to [0, 1], normalise; (h, w, 3)."""
    width, height = photo.size
    size = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
    pixels = np.asarray(photo.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    top, left = round((pixels.shape[0] - crop) / 2), round((pixels.shape[1] - crop) / 2)
    window = pixels[top : top + crop, left : left + crop] / 255.0
    return (window - np.array(mean, np.float32)) / np.array(std, np.float32)


@pytest.mark.parametrize("box", [None, (0, 0, 701, 523), (13, 40, 461, 494)], ids=["square", "landscape", "odd-margin"])
def test_dino_preprocessing_equals_resize256_bicubic_centercrop224(scorer, photos, box):
    photo = photos["dog"] if box is None else photos["dog"].crop(box)
    expected = hand_computed(photo, 256, 224, IMAGENET_MEAN, IMAGENET_STD)
    pixels = scorer.dino._pixels([photo])  # what the scorer feeds the DINO model
    assert pixels.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), expected, atol=1e-6, rtol=0)
    # and the DINO score's embedding is the CLS token of exactly those pixels
    with torch.inference_mode():
        cls = scorer.dino.model(pixel_values=torch.from_numpy(expected).permute(2, 0, 1)[None]).last_hidden_state[:, 0]
    np.testing.assert_allclose(scorer.embed_images([photo]).dino, torch.nn.functional.normalize(cls, dim=-1).numpy(), atol=1e-6)


@pytest.mark.parametrize("box", [None, (0, 0, 454, 448)], ids=["square", "odd-margin"])
def test_clip_preprocessing_equals_resize224_bicubic_centercrop224(scorer, photos, box):
    photo = photos["backpack"] if box is None else photos["backpack"].crop(box)
    expected = hand_computed(photo, 224, 224, CLIP_MEAN, CLIP_STD)
    np.testing.assert_allclose(scorer.clip._pixels([photo])[0].permute(1, 2, 0).numpy(), expected, atol=1e-6, rtol=0)


def test_clip_t_is_the_raw_cosine(scorer, photos):
    images, texts = [photos["dog"], photos["teapot"]], ["a dog in the jungle", "a cube shaped teapot"]
    emb = scorer.embed_images(images)
    clip_t = rowwise_cosine(emb.clip, scorer.embed_texts(texts))
    role = scorer.clip
    with torch.inference_mode():
        pixels = role._pixels(images)
        if role.spec.backend == "transformers":
            tokens = role.tokenizer(texts, padding=True, return_tensors="pt")
            image_features = role.model.get_image_features(pixel_values=pixels).pooler_output
            text_features = role.model.get_text_features(**tokens).pooler_output
            logit_scale = role.model.logit_scale.exp().item()
        else:
            image_features = role.model.encode_image(pixels)
            text_features = role.model.encode_text(role.tokenizer(texts))
            logit_scale = role.model.logit_scale.exp().item()
    norm = torch.nn.functional.normalize
    expected = (norm(image_features, dim=-1) * norm(text_features, dim=-1)).sum(-1).numpy()
    np.testing.assert_allclose(clip_t, expected, atol=1e-6)
    assert np.all(np.abs(clip_t) <= 1.0)
    assert logit_scale > 1.5 and not np.allclose(clip_t, logit_scale * expected)  # not the logit (x100) scale
    assert "raw cosine" in SCALE and "not x100" in SCALE


def test_batched_scores_equal_a_per_pair_loop(scorer, photos):
    small = {name: photo.resize((300, 300), Image.Resampling.BICUBIC) for name, photo in photos.items()}
    generated = [small["dog"].crop((0, 0, 280, 240)), small["dog"].transpose(Image.Transpose.FLIP_LEFT_RIGHT), small["cat"]]
    references = [small["dog"], small["dog6"]]
    emb = scorer.embed_images(references + generated)
    batched_dino = pair_means(emb.dino[2:], emb.dino[:2])
    batched_clip = pair_means(emb.clip[2:], emb.clip[:2])
    for g, image in enumerate(generated):
        dino, clip = [], []
        for reference in references:  # as research scripts do: embed both images for every pair
            a, b = scorer.embed_images([image]), scorer.embed_images([reference])
            dino.append(float(a.dino[0] @ b.dino[0]))
            clip.append(float(a.clip[0] @ b.clip[0]))
        assert abs(batched_dino[g] - np.mean(dino)) <= 1e-5
        assert abs(batched_clip[g] - np.mean(clip)) <= 1e-5


def test_selector_is_its_own_model(scorer, photos):
    scores = scorer.selection_scores([photos["dog"], photos["teapot"]], ["a dog", "a dog"])
    own = rowwise_cosine(scorer.select.embed_images([photos["dog"], photos["teapot"]]), scorer.select.embed_texts(["a dog"] * 2))
    np.testing.assert_allclose(scores, own, atol=1e-6)
    assert scorer.select.spec.model == "zoo:clip_l14"
    with pytest.raises(ValueError, match="clip_select"):
        Scorer(scorer.dino, scorer.clip).selection_scores([photos["dog"]], ["a dog"])


# --- decoding bad files ---------------------------------------------------------------------------


def test_bad_image_files_raise_with_a_reason(tmp_path, dreambench_dir):
    jpeg = (dreambench_dir / "dog" / "00.jpg").read_bytes()
    cases = {
        "missing.jpg": (None, "missing_file"),
        "empty.png": (b"", "unreadable_image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "unreadable_image"),
        "corrupt.png": (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50, "unreadable_image"),
        "notes.jpg": (b"this is a text file, not a photo\n", "unreadable_image"),
    }
    for name, (data, reason) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(UnreadableImage) as caught:
            decode_image(tmp_path / name)
        assert caught.value.reason == reason and name in str(caught.value), name
    grey = io.BytesIO()
    Image.new("L", (40, 30), 7).save(grey, format="PNG")
    assert decode_image(grey.getvalue()).mode == "RGB"


# --- bootstrap ------------------------------------------------------------------------------------


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_data():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.5, 0.1, 20), rng.normal(0.5, 0.1, 2000)
    a, b = bootstrap_estimate(small, seed=3), bootstrap_estimate(large, seed=3)
    assert a.ci_low < a.mean < a.ci_high and b.ci_low < b.mean < b.ci_high
    assert (b.ci_high - b.ci_low) < (a.ci_high - a.ci_low) / 4
    assert bootstrap_estimate(small, seed=3) == a  # seeded: reproducible
    assert abs(a.mean - small.mean()) < 1e-12


def test_stratified_bootstrap_weights_groups_and_skips_nan():
    values = [1.0, 1.0, 1.0, 0.0, float("nan")]
    groups = ["a", "a", "a", "b", "b"]
    per_subject = bootstrap_estimate(values, groups, equal_group_weight=True)
    assert per_subject.mean == pytest.approx(0.5) and per_subject.n == 4
    assert per_subject.ci_low == per_subject.ci_high == pytest.approx(0.5)  # no spread inside either group
    assert bootstrap_estimate(values, groups).mean == pytest.approx(0.75)  # weighted by units
    assert np.isnan(bootstrap_estimate([float("nan")]).mean)
    with pytest.raises(ValueError, match="group labels"):
        bootstrap_estimate([1.0, 2.0], ["a"])


# --- Pass@N ---------------------------------------------------------------------------------------


def test_selection_weights_equal_enumerating_every_subset():
    rng = np.random.default_rng(0)
    for total in (1, 2, 4, 6):
        scores = np.round(rng.random(total), 1)  # rounding makes ties
        for n in range(1, total + 1):
            brute = np.zeros(total)
            subsets = list(combinations(range(total), n))
            for subset in subsets:
                best = max(subset, key=lambda i: (scores[i], -i))  # a tie goes to the earlier candidate
                brute[best] += 1 / len(subsets)
            np.testing.assert_allclose(selection_weights(scores, n), brute, atol=1e-12)
    np.testing.assert_allclose(selection_weights([0.1, 0.9, 0.5], 1), [1 / 3] * 3)
    np.testing.assert_allclose(selection_weights([0.1, 0.9, 0.9], 3), [0, 1, 0])
    with pytest.raises(ValueError, match="NaN"):
        selection_weights([0.1, float("nan")], 1)


def test_passn_curve_starts_at_the_mean_and_ends_at_the_selected():
    rows = [{"case": c, "select_clip_t": s, "identity": i, "score": m}
            for c, cands in enumerate([[(0.1, 0.9, 1.0), (0.3, 0.0, 0.0), (0.2, 0.5, 0.5)], [(0.5, 0.5, 0.2), (0.4, 0.9, 0.8), (0.6, 0.1, 0.4)]])
            for s, i, m in cands]
    curve = passn_curve(rows, ("case",), ["score"], "identity", identity_weight=1.0)
    point = {(p["selector"], p["n"]): p["score"] for p in curve}
    assert point[("clip_t", 1)] == pytest.approx(np.mean([1.0, 0.0, 0.5, 0.2, 0.8, 0.4]))
    assert point[("clip_t", 3)] == pytest.approx((0.0 + 0.4) / 2)  # the text score picks the 2nd and the 3rd
    assert point[("identity_aware", 3)] == pytest.approx((1.0 + 0.8) / 2)  # text + identity picks the 1st and the 2nd
    assert point[("clip_t", 1)] == point[("identity_aware", 1)]


# --- multi-subject --------------------------------------------------------------------------------


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def collage(photos: list[Image.Image], blank: tuple[int, ...] = (), size: int = 112) -> Image.Image:
    """The subjects' photos side by side (a stand-in for a generated image); `blank` leaves slots grey."""
    canvas = Image.new("RGB", (size * len(photos), size), (128, 128, 128))
    for i, photo in enumerate(photos):
        if i not in blank:
            canvas.paste(photo.resize((size, size), Image.Resampling.BICUBIC), (i * size, 0))
    return canvas


def synthetic_cases(dreambench_dir: Path, combos: list[tuple[str, ...]], candidates: int = 2) -> list[dict]:
    """Cases from DreamBench photos: references are each subject's photo 01, candidate 0 puts every
    subject's photo 00 in the image, later candidates leave one subject out."""
    noun = {"dog": "dog", "dog6": "dog", "cat": "cat", "teapot": "teapot", "backpack": "backpack", "vase": "vase"}
    rows = []
    for c, combo in enumerate(combos):
        photos = [decode_image(dreambench_dir / s / "00.jpg") for s in combo]
        rows.append({
            "case_id": f"case-{c}", "instruction": " and ".join(f"<{i + 1}> the {noun[s]}" for i, s in enumerate(combo)),
            "prompt": "a photo of a " + " and a ".join(noun[s] for s in combo), "categories": [noun[s] for s in combo],
            "references": [{"bytes": (dreambench_dir / s / "01.jpg").read_bytes(), "path": None} for s in combo],
            "generated": [{"bytes": png(collage(photos, () if k == 0 else (k % len(combo),))), "path": None} for k in range(candidates)],
        })
    return rows


@pytest.fixture(scope="module")
def scored_cases(dreambench_dir):
    rows = synthetic_cases(dreambench_dir, [("teapot",), ("dog", "backpack"), ("dog", "dog6", "vase")])
    cases = [decode_case(row, dreambench_dir)[0] for row in rows]
    scorer = Scorer.from_specs(DINO, CLIPS["transformers"], SELECT)
    detector = load_role(DETECTOR)
    # the random tiny detector: threshold 0 finds boxes for everything, 0.999 lets only a few through
    first_only = [replace(case, candidates=case.candidates[:1], candidate_index=[0]) for case in cases]
    found_all = score_cases(scorer, detector, first_only, GroundingParams(box_threshold=0.0, text_threshold=0.0), with_selection=True)
    strict = score_cases(scorer, detector, cases, GroundingParams(box_threshold=0.999, text_threshold=0.999, candidates_per_subject=2))
    return cases, scorer, found_all, strict


def test_uno_style_scores_each_reference_against_the_whole_image(scored_cases):
    cases, scorer, (candidates, subjects), _ = scored_cases
    assert len(candidates) == 3 and len(subjects) == 1 + 2 + 3
    case = cases[1]
    refs, gen = scorer.embed_images(case.references), scorer.embed_images(case.candidates[:1])
    row = next(r for r in candidates if r["case_id"] == "case-1" and r["candidate"] == 0)
    assert row["uno_dino"] == pytest.approx(float(np.mean(refs.dino @ gen.dino[0])), abs=1e-5)
    assert row["uno_clip_i"] == pytest.approx(float(np.mean(refs.clip @ gen.clip[0])), abs=1e-5)
    text = scorer.embed_texts([case.prompt])[0]
    assert row["clip_t"] == pytest.approx(float(gen.clip[0] @ text), abs=1e-5)
    assert not np.isnan(row["select_clip_t"])


def test_grounded_scores_match_crops_one_to_one(scored_cases):
    _, _, (candidates, subjects), _ = scored_cases
    assert all(r["missing_rate"] == 0.0 for r in candidates)  # threshold 0: every category has boxes
    for r in subjects:
        assert r["found"] and len(r["box"]) == 4 and -1 <= r["grounded_dino"] <= 1
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1
    # the two dogs of case 2 are matched to two different boxes
    dogs = [r for r in subjects if r["case_id"] == "case-2" and r["candidate"] == 0 and r["category"] == "dog"]
    assert len(dogs) == 2 and dogs[0]["box"] != dogs[1]["box"]
    assert _assign(np.array([[0.9, 0.8], [0.85, 0.1]])) == {0: 0, 1: 1}  # best pair first, each box used once
    assert _assign(np.array([[0.2, 0.9, 0.3]])) == {0: 1}
    assert _assign(np.zeros((2, 0))) == {}


def test_missing_subjects_score_zero_and_show_in_the_missing_rate(scored_cases):
    _, _, _, (candidates, subjects) = scored_cases
    missing = [r for r in subjects if not r["found"]]
    assert missing, "the strict thresholds should leave some subject unfound"
    assert all(np.isnan(r["grounded_dino"]) and r["box"] is None for r in missing)
    for row in candidates:
        mine = [r for r in subjects if r["case_id"] == row["case_id"] and r["candidate"] == row["candidate"]]
        scored = [0.0 if not r["found"] else r["grounded_dino"] for r in mine]
        assert row["missing_rate"] == pytest.approx(sum(not r["found"] for r in mine) / len(mine))
        assert row["grounded_dino"] == pytest.approx(np.mean(scored))
        assert row["worst_dino"] == pytest.approx(min(scored)) and row["worst_dino"] <= row["grounded_dino"] + 1e-12
        assert np.isnan(row["select_clip_t"])  # no selector asked for


def test_scores_break_down_by_subject_count(scored_cases):
    _, _, _, (candidates, _) = scored_cases
    table = by_subject_count(candidates, samples=200)
    assert [r["subjects"] for r in table] == ["1", "2", "3", "all"]
    assert [r["cases"] for r in table] == [1, 1, 1, 3]
    for row in table:
        for metric in ("uno_dino", "grounded_dino", "missing_rate", "worst_dino"):
            assert row[f"{metric}_ci_low"] - 1e-12 <= row[metric] <= row[f"{metric}_ci_high"] + 1e-12
    overall = table[-1]
    assert overall["missing_rate"] == pytest.approx(np.mean([np.mean([c["missing_rate"] for c in candidates if c["case_id"] == i])
                                                              for i in ("case-0", "case-1", "case-2")]))


def test_bad_cases_are_dropped_with_reasons(tmp_path, dreambench_dir):
    good = synthetic_cases(dreambench_dir, [("cat",)], candidates=1)[0]
    (tmp_path / "gen.png").write_bytes(good["generated"][0]["bytes"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = {
        "by-path": {**good, "generated": [{"bytes": None, "path": "gen.png"}, {"bytes": None, "path": "absent.png"},
                                          {"bytes": None, "path": "broken.png"}]},
        "no-refs": {**good, "references": [], "categories": []},
        "mismatch": {**good, "categories": ["cat", "dog"]},
        "bad-ref": {**good, "references": [{"bytes": b"\xff\xd8\xff truncated", "path": None}]},
        "dot": {**good, "categories": ["st. bernard"]},
        "none": {**good, "generated": [{"bytes": b"", "path": None}]},
    }
    outcome = {name: decode_case({**row, "case_id": name}, tmp_path) for name, row in rows.items()}
    case, drops = outcome["by-path"]
    assert case is not None and case.candidate_index == [0]
    assert [(d["candidate"], d["reason"]) for d in drops] == [(1, "missing_file"), (2, "unreadable_image")]
    expected = {"no-refs": "no_references", "mismatch": "categories_references_mismatch", "bad-ref": "reference_unreadable_image",
                "dot": "bad_category", "none": "no_readable_generated"}
    for name, reason in expected.items():
        case, drops = outcome[name]
        assert case is None and drops[-1]["reason"] == reason and drops[-1]["detail"], name


def test_a_bad_cases_table_fails_before_any_work(tmp_path, dreambench_dir):
    with pytest.raises(CasesError, match="not found"):
        read_cases_table(tmp_path / "absent.parquet")
    (tmp_path / "text.parquet").write_text("case_id,instruction\n")
    with pytest.raises(CasesError, match="not a readable Parquet"):
        read_cases_table(tmp_path / "text.parquet")
    pq.write_table(pa.table({"case_id": ["a"], "instruction": ["x"]}), tmp_path / "thin.parquet")
    with pytest.raises(CasesError, match="missing columns categories, references, generated"):
        read_cases_table(tmp_path / "thin.parquet")
    pq.write_table(pa.Table.from_pylist([], schema=CASES), tmp_path / "empty.parquet")
    with pytest.raises(CasesError, match="no cases"):
        read_cases_table(tmp_path / "empty.parquet")
    row = synthetic_cases(dreambench_dir, [("cat",)], candidates=1)[0]
    pq.write_table(pa.Table.from_pylist([row, row], schema=CASES), tmp_path / "twice.parquet")
    with pytest.raises(CasesError, match="duplicate case_id 'case-0'"):
        read_cases_table(tmp_path / "twice.parquet")
    without_prompt = pa.Table.from_pylist([row], schema=CASES).drop_columns(["prompt"])
    pq.write_table(without_prompt, tmp_path / "no-prompt.parquet")
    assert read_cases_table(tmp_path / "no-prompt.parquet").column("prompt").to_pylist() == [None]
