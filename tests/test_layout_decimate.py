"""Property tests for the grid math, the RLE round trip and decimation renumbering."""
from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from music_model.media import masks as rle
from music_model.subjects.decimate import box_area, decimate, mentioned, token
from music_model.subjects.layout import GRID, box_to_mask, cell_ious, layout_grid, layout_to_text, subject_regions, text_to_layout

boxes = st.tuples(
    st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.02, 1.0), st.floats(0.02, 1.0)
).map(lambda b: np.array([b[0], b[1], min(1.0, b[0] + b[2]), min(1.0, b[1] + b[3])]))


@settings(max_examples=60, deadline=None)
@given(st.lists(boxes, min_size=1, max_size=12), st.sampled_from([(64, 64), (48, 80), (97, 61)]))
def test_layout_places_every_subject_and_only_known_ids(box_list, size):
    height, width = size
    masks = np.stack([box_to_mask(b, height, width) for b in box_list])
    ids = list(range(1, len(box_list) + 1))
    layout = layout_grid(masks, ids)
    assert layout.shape == (GRID * GRID,)
    assert set(np.unique(layout)) <= {0, *ids}
    assert all((layout == i).any() for i in ids)  # the repair rule: nobody is left without a cell
    assert np.array_equal(text_to_layout(layout_to_text(layout)), layout)


@settings(max_examples=40, deadline=None)
@given(boxes, st.sampled_from([(64, 64), (40, 72)]))
def test_cell_ious_match_direct_computation(box, size):
    height, width = size
    mask = box_to_mask(box, height, width)
    ious = cell_ious(mask[None])[0]
    rows = np.round(np.linspace(0, height, GRID + 1)).astype(int)
    cols = np.round(np.linspace(0, width, GRID + 1)).astype(int)
    for r in range(GRID):
        for c in range(GRID):
            cell = np.zeros_like(mask)
            cell[rows[r]:rows[r + 1], cols[c]:cols[c + 1]] = True
            union = (cell | mask).sum()
            expected = (cell & mask).sum() / union if union else 0.0
            assert abs(ious[r * GRID + c] - expected) < 1e-12


def test_full_image_subject_fills_the_grid_and_threshold_uses_lambda():
    full = np.ones((1, 64, 64), bool)
    assert (layout_grid(full, [1]) == 1).all()
    quarter = box_to_mask(np.array([0, 0, 0.5, 0.5]), 64, 64)[None]
    layout = layout_grid(quarter, [1]).reshape(GRID, GRID)
    assert (layout[:4, :4] == 1).all() and (layout[4:, :] == 0).all() and (layout[:, 4:] == 0).all()


def test_a_worked_layout_example_differs_between_lambda_0_05_and_0_1():
    """80 x 80 px, so each cell is 10 x 10. Subject 1 covers rows 0-11 and columns 0-21 (264 px):
    two whole cells, three 20 px slivers and a 4 px corner, each IoU = overlap / (264 + 100 - overlap).
    Subject 2 covers rows 50-79 and columns 50-79 (900 px): nine whole cells of IoU 100 / 900."""
    masks = np.zeros((2, 80, 80), bool)
    masks[0, :12, :22] = True
    masks[1, 50:, 50:] = True
    whole, sliver, corner = Fraction(100, 264), Fraction(20, 344), Fraction(4, 360)
    expected = {1: {0: whole, 1: whole, 2: sliver, 8: sliver, 9: sliver, 10: corner},
                2: {row * 8 + col: Fraction(100, 900) for row in (5, 6, 7) for col in (5, 6, 7)}}
    ious = cell_ious(masks)
    for subject, cells in expected.items():
        want = np.zeros(64)
        want[list(cells)] = [float(v) for v in cells.values()]
        np.testing.assert_allclose(ious[subject - 1], want, rtol=0, atol=1e-15)
    positive = [v for cells in expected.values() for v in cells.values()]
    mean = sum(positive) / len(positive)  # (2 * 25/66 + 3 * 5/86 + 1/90 + 1) / 15 = 0.12954
    assert round(float(mean), 5) == 0.12954
    # tau = lambda * mean: 0.0064770 at 0.05 and 0.012954 at 0.1; the corner's 1/90 = 0.011111 is between.
    assert 0.05 * mean < corner < Fraction(1, 10) * mean and sliver > Fraction(1, 10) * mean
    grid_005 = ("1 1 1 0 0 0 0 0\n1 1 1 0 0 0 0 0\n0 0 0 0 0 0 0 0\n0 0 0 0 0 0 0 0\n"
                "0 0 0 0 0 0 0 0\n0 0 0 0 0 2 2 2\n0 0 0 0 0 2 2 2\n0 0 0 0 0 2 2 2")
    grid_01 = grid_005.replace("1 1 1 0 0 0 0 0\n0 0 0", "1 1 0 0 0 0 0 0\n0 0 0", 1)
    assert grid_01 != grid_005
    assert layout_to_text(layout_grid(masks, [1, 2], lam=0.05)) == grid_005
    assert layout_to_text(layout_grid(masks, [1, 2], lam=0.1)) == grid_01


@settings(max_examples=40, deadline=None)
@given(st.lists(boxes, min_size=1, max_size=4), st.sampled_from([(30, 50), (64, 64)]))
def test_rle_round_trip(box_list, size):
    for box in box_list:
        mask = box_to_mask(box, *size)
        encoded = rle.encode(mask)
        assert np.array_equal(rle.decode(encoded), mask)
        assert rle.area(encoded) == mask.sum()


def box_relayout(height=64, width=64):
    """Layouts of box-region subjects, as the decimate stage computes them."""
    return lambda subjects: layout_grid(subject_regions(subjects, height, width), [s["id"] for s in subjects]).tolist()


def sample_with(areas):
    """Subjects whose boxes have `areas` (in 1/10,000 of the image), laid out left to right."""
    n = len(areas)
    subjects = [{"id": i, "category": f"cat{i}", "box": [(i - 1) / n, 0.0, (i - 1) / n + a / 10_000, 1.0], "region": "box"}
                for i, a in enumerate(areas, 1)]
    instruction = "Put " + ", ".join(token(i) for i in range(1, n + 1)) + " together."
    cot = {
        "subjects": [{"id": i, "role": f"{token(i)} is here", "placement": "left"} for i in range(1, n + 1)],
        "relations": [f"{token(i)} near {token(i % n + 1)}" for i in range(1, n + 1)],
    }
    return {"subjects": subjects, "instruction": instruction, "cot": cot, "layout": box_relayout()(subjects)}


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 10_000), min_size=2, max_size=12))
def test_decimation_renumbers_consistently(areas):
    steps = decimate(sample_with(areas), box_relayout())
    assert [len(s["subjects"]) for s in steps] == list(range(len(areas), 1, -1))
    for before, after in zip(steps, steps[1:]):
        dropped = min(before["subjects"], key=lambda s: (box_area(s["box"]), -s["id"]))
        kept_categories = [s["category"] for s in before["subjects"] if s is not dropped]
        assert [s["category"] for s in after["subjects"]] == kept_categories  # order kept
        assert dropped["category"] in after["instruction"]
    for step in steps:
        ids = [s["id"] for s in step["subjects"]]
        assert ids == list(range(1, len(ids) + 1))
        assert mentioned(step["instruction"]) == set(ids)
        assert [e["id"] for e in step["cot"]["subjects"]] == ids
        for entry in step["cot"]["subjects"]:
            assert mentioned(entry["role"]) == {entry["id"]}
        for relation in step["cot"]["relations"]:
            assert mentioned(relation) <= set(ids)
        assert set(step["layout"]) <= {0, *ids}
        assert step["layout"] == box_relayout()(step["subjects"])  # a fresh layout of who is left


def test_a_dropped_subject_named_after_its_token_is_named_once():
    from music_model.subjects.decimate import rewrite

    text = "put <s1> (cup) beside <s3> (shrimp) and <s2>"
    assert rewrite(text, {1: 1, 2: 2}, {3: "shrimp"}) == "put <s1> (cup) beside shrimp and <s2>"
    assert rewrite(text, {3: 1}, {1: "cup", 2: "plate"}) == "put cup beside <s1> (shrimp) and plate"
