"""Detector and segmenter roles on their tiny zoo checkpoints, with real DreamBench photos.

The zoo models have random weights, so these tests check the contract (types, shapes, dtypes,
value ranges, phrase bookkeeping, thresholds, batching) rather than what the boxes and masks show.
"""
import numpy as np
import pytest
from PIL import Image

from data_specs.roles import SpecError
from music_model.roles import load_role
from music_model.roles.detector import Detections, corners, phrase_scores, phrase_token_mask, prompt_for
from music_model.roles.segmenter import pixel_boxes

SEGMENTERS = [("transformers", "zoo:sam2"), ("transformers", "zoo:sam"), ("segment_anything", "zoo:sam_official")]


@pytest.fixture(scope="module")
def images(dreambench_dir) -> list[Image.Image]:
    """A square 780 px dog and a landscape 1000x600 crop of a cat photo (so H and W differ)."""
    dog = Image.open(dreambench_dir / "dog" / "00.jpg").convert("RGB")
    cat = Image.open(dreambench_dir / "cat" / "00.jpg").convert("RGB").crop((100, 200, 1100, 800))
    return [dog, cat]


@pytest.fixture(scope="module")
def detector():
    return load_role({"role": "detector", "backend": "transformers", "model": "zoo:grounding_dino", "batch_size": 2})


def check_detections(found: Detections, phrases: list[str]) -> None:
    n = len(found)
    assert found.boxes.shape == (n, 4) and found.boxes.dtype == np.float32
    assert found.scores.shape == (n,) and found.scores.dtype == np.float32
    assert found.phrase_index.shape == (n,) and np.issubdtype(found.phrase_index.dtype, np.integer)
    assert ((found.boxes >= 0) & (found.boxes <= 1)).all()
    assert (found.boxes[:, 0] <= found.boxes[:, 2]).all() and (found.boxes[:, 1] <= found.boxes[:, 3]).all()
    assert ((found.phrase_index >= 0) & (found.phrase_index < len(phrases))).all()
    assert found.labels == [phrases[k] for k in found.phrase_index]
    assert (np.diff(found.scores) <= 0).all(), "detections are best first"


def test_detector_batch(detector, images):
    phrases = [["dog", "Red Backpack"], ["cat"]]
    loose = detector.detect(images, phrases, box_threshold=0.0, text_threshold=0.0)
    assert len(loose) == 2
    for found, image_phrases in zip(loose, phrases):
        check_detections(found, image_phrases)
        # every query's probabilities are above 0, so at threshold 0 each of the 30 queries is a box
        assert len(found) == detector.model.config.num_queries
    assert set(loose[0].labels) == {"dog", "Red Backpack"}, "boxes go to both phrases, labels as given"

    strict = detector.detect(images, phrases, box_threshold=0.5, text_threshold=0.9)
    assert 0 < sum(map(len, strict)) < sum(map(len, loose)), "the thresholds keep some boxes, not all"
    for few, many, image_phrases in zip(strict, loose, phrases):
        check_detections(few, image_phrases)
        assert (few.scores > 0.9).all()
        for box, score, index in zip(few.boxes, few.scores, few.phrase_index):
            match = np.flatnonzero(np.isclose(many.scores, score) & (many.phrase_index == index))
            assert any(np.allclose(many.boxes[i], box) for i in match), "a strict box is one of the loose boxes"


def test_detector_edge_cases(detector, images):
    nothing = detector.detect(images, [["dog"], []], box_threshold=1.0)
    for found in nothing:
        check_detections(found, ["dog"])
        assert len(found) == 0
    with pytest.raises(ValueError, match="phrase 1"):
        detector.detect(images[:1], [["dog", "a. b"]])
    with pytest.raises(ValueError, match="2 images but 1"):
        detector.detect(images, [["dog"]])


def test_detector_thresholds_from_options(images):
    spec = {"role": "detector", "backend": "transformers", "model": "zoo:grounding_dino", "batch_size": 2}
    strict = load_role({**spec, "options": {"box_threshold": 1.0}})
    assert [len(found) for found in strict.detect(images, [["dog"], ["cat"]])] == [0, 0]
    with pytest.raises(SpecError, match="options.box_treshold"):
        load_role({**spec, "options": {"box_treshold": 0.3}})


def test_phrase_token_spans_cover_exactly_each_phrase(detector):
    phrases = ["Red backpack", "dog", "teapot"]
    text, spans = prompt_for(phrases, "test")
    assert text == "red backpack. dog. teapot."
    tokens = detector.processor.tokenizer(text, return_offsets_mapping=True)
    mask = phrase_token_mask(np.array(tokens["offset_mapping"]), spans, 256)
    ids = np.array(tokens["input_ids"])
    for k, phrase in enumerate(phrases):
        assert detector.processor.tokenizer.decode(ids[mask[k, : len(ids)]]) == phrase.lower()
    assert not mask[:, len(ids):].any() and mask.sum(axis=0).max() == 1


def test_a_token_two_phrases_share_does_not_decide_between_them(detector):
    """GroundingDINO's grounding evaluation: a phrase's score is the box's token probabilities
    averaged over the phrase (a normalised positive map), not its best token."""
    phrases = ["traffic light", "traffic cone", "car", "sports car"]
    text, spans = prompt_for(phrases, "test")
    tokens = detector.processor.tokenizer(text, return_offsets_mapping=True)
    words = detector.processor.tokenizer.convert_ids_to_tokens(tokens["input_ids"])
    in_phrase = phrase_token_mask(np.array(tokens["offset_mapping"]), spans, 16)
    # Box 0 is a traffic cone: "traffic" (in both names) 0.9, "cone" 0.6, "light" 0.2. Box 1 is a
    # plain car: "car" 0.8 wherever it stands, "sports" 0.1.
    by_word = [{"traffic": 0.9, "cone": 0.6, "light": 0.2}, {"car": 0.8, "sports": 0.1}]
    probs = np.array([[seen.get(word, 0.0) for word in words] + [0.0] * (16 - len(words)) for seen in by_word])
    scores = phrase_scores(probs, in_phrase)
    np.testing.assert_allclose(scores, [[(0.9 + 0.2) / 2, (0.9 + 0.6) / 2, 0.0, 0.0],
                                        [0.0, 0.0, 0.8, (0.1 + 0.8) / 2]], atol=1e-12)
    assert scores.argmax(axis=1).tolist() == [1, 2]  # traffic cone, car
    best_token = np.where(in_phrase[None], probs[:, None, :], 0.0).max(axis=2)
    assert best_token.argmax(axis=1).tolist() == [0, 2] and best_token[1, 2] == best_token[1, 3]  # the old rule: ties


def test_box_conversions():
    np.testing.assert_allclose(corners(np.array([[0.5, 0.5, 0.2, 0.4], [0.95, 0.05, 0.2, 0.2]])),
                               [[0.4, 0.3, 0.6, 0.7], [0.85, 0.0, 1.0, 0.15]], atol=1e-6)
    assert corners(np.zeros((0, 4))).shape == (0, 4)
    # PIL sizes are (W, H): x scales by the width, y by the height; out-of-range values are clipped
    pixels = pixel_boxes(np.array([[0.1, 0.2, 0.5, 1.2]]), (1000, 600), "test")
    assert pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, [[100, 120, 500, 600]])
    assert pixel_boxes(np.zeros((0, 4)), (10, 10), "test").shape == (0, 4)


@pytest.mark.parametrize("backend,model", SEGMENTERS, ids=[m for _, m in SEGMENTERS])
def test_segmenter_batch(backend, model, images):
    segmenter = load_role({"role": "segmenter", "backend": backend, "model": model, "batch_size": 2})
    dog_boxes = np.array([[0.1, 0.1, 0.6, 0.9], [0.5, 0.4, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0]], np.float32)
    cat_boxes = np.array([[0.2, 0.3, 0.7, 0.6]], np.float32)
    empty = np.zeros((0, 4), np.float32)
    # three images, the middle without boxes: the two with boxes share one batch of 2
    masks = segmenter.segment([images[0], images[1], images[1]], [dog_boxes, empty, cat_boxes])
    assert len(masks) == 3
    for image_masks, image, boxes in zip(masks, [images[0], images[1], images[1]], [dog_boxes, empty, cat_boxes]):
        assert isinstance(image_masks, np.ndarray) and image_masks.dtype == bool
        assert image_masks.shape == (len(boxes), image.height, image.width)
    assert not np.array_equal(masks[0][0], masks[0][1]), "each box prompts its own mask"

    # a box's mask does not depend on the rest of its batch (SAM pads box lists by repetition)
    alone = segmenter.segment([images[1]], [cat_boxes])[0]
    assert alone.shape == masks[2].shape
    assert (alone == masks[2]).mean() > 0.999

    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        segmenter.segment([images[0]], [np.zeros((2, 3), np.float32)])


@pytest.mark.parametrize(
    "files,options,message",
    [
        ([], {}, "has no sam_config.json"),
        (["sam_custom.pth"], {}, "options.model_type: needed"),
        (["sam_custom.pth"], {"model_type": "vit_x"}, "'vit_x' is not one of"),
    ],
)
def test_segment_anything_checkpoint_errors(tmp_path, files, options, message):
    for name in files:
        (tmp_path / name).write_bytes(b"")
    model = str(tmp_path / files[0]) if files else str(tmp_path)
    spec = {"role": "segmenter", "backend": "segment_anything", "model": model, "options": options}
    with pytest.raises(SpecError, match=message):
        load_role(spec)
