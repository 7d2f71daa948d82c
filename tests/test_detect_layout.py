"""Detect's choice of one box per subject, the framing of layout's CLIP views, and exact SAM box
prompts under bf16."""
import numpy as np
import pytest
import torch
from PIL import Image

from music_model.media.images import NEUTRAL, subject_view
from music_model.media.preprocess import clip_transform
from music_model.roles import load_role
from music_model.roles.detector import Detections
from tasks.stages.detect import select_subjects


def detections(found: list[tuple[int, float, list[float]]], phrases: list[str]) -> Detections:
    """(phrase, score, xyxy box) triples as the detector returns them, best first."""
    found = sorted(found, key=lambda f: -f[1])
    return Detections(boxes=np.array([f[2] for f in found], np.float32).reshape(-1, 4),
                      scores=np.array([f[1] for f in found], np.float32),
                      phrase_index=np.array([f[0] for f in found], np.int64), labels=[phrases[f[0]] for f in found])


def test_coincident_boxes_of_two_categories_keep_the_higher_scoring_subject():
    phrases = ["truck", "pickup truck", "dog"]
    found = detections([(0, 0.6, [0.10, 0.10, 0.60, 0.50]), (1, 0.8, [0.11, 0.10, 0.60, 0.51]),
                        (2, 0.5, [0.60, 0.50, 0.90, 0.95])], phrases)
    subjects, removed = select_subjects(phrases, found, min_box_area=0.01, max_box_overlap=0.9)
    assert [(s["id"], s["category"]) for s in subjects] == [(1, "pickup truck"), (2, "dog")]
    assert len(removed) == 1 and removed[0].startswith("truck: the box of pickup truck (IoU 0.9")
    # the threshold is what merges them: at 1 (never) both stay, in the categories' order
    subjects, removed = select_subjects(phrases, found, min_box_area=0.01, max_box_overlap=1.0)
    assert [s["category"] for s in subjects] == phrases and removed == []


def test_a_best_box_under_the_area_bound_removes_its_subject_rather_than_a_larger_box_replacing_it():
    phrases = ["tennis ball", "racket"]
    found = detections([(0, 0.9, [0.40, 0.40, 0.45, 0.45]),  # the ball: best score, 0.25% of the image
                        (0, 0.4, [0.20, 0.20, 0.70, 0.80]),  # a larger, worse box for the same phrase
                        (1, 0.7, [0.50, 0.10, 0.80, 0.60])], phrases)
    subjects, removed = select_subjects(phrases, found, min_box_area=0.01, max_box_overlap=0.9)
    assert [(s["id"], s["category"]) for s in subjects] == [(1, "racket")]
    assert removed == ["tennis ball: best box 0.0025 of the image"]
    subjects, _ = select_subjects(phrases, found, min_box_area=0.001, max_box_overlap=0.9)
    np.testing.assert_allclose(subjects[0]["box"], [0.40, 0.40, 0.45, 0.45])


def test_mask_and_box_views_of_a_tall_subject_show_it_whole_in_one_frame():
    """A 1:3 subject striped red / green / blue from top to bottom: CLIP's 224 centre crop of
    either view holds all three stripes, and the two views differ only outside the mask."""
    image = np.full((400, 400, 3), (250, 250, 250), np.uint8)
    stripes = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for k, colour in enumerate(stripes):
        image[50 + 100 * k:150 + 100 * k, 150:250] = colour  # 100 wide, 300 tall
    mask = np.zeros((400, 400), bool)
    mask[50:350, 160:240] = True  # inside the box, narrower than it
    box = [140 / 400, 40 / 400, 260 / 400, 360 / 400]  # a little background around the subject
    box_view, mask_view = subject_view(Image.fromarray(image), box), subject_view(Image.fromarray(image), box, mask)
    assert box_view.size == mask_view.size == (320, 320)
    box_pixels, mask_pixels = np.asarray(box_view), np.asarray(mask_view)
    inside = np.zeros((320, 320), bool)
    inside[:, 100:220] = mask[40:360, 140:260]  # the box's 120 columns, centred on the square
    assert (box_pixels[inside] == mask_pixels[inside]).all(), "one frame: the mask's pixels are where the box view has them"
    assert (mask_pixels[~inside] == NEUTRAL).all()
    for view in (box_view, mask_view):
        seen = clip_transform([view], 224, (0, 0, 0), (1, 1, 1))[0].permute(1, 2, 0).numpy()  # what the encoder gets
        rows_of = [np.flatnonzero((np.abs(seen - np.array(c) / 255).max(axis=2) < 0.1).any(axis=1)) for c in stripes]
        # each stripe is 100 of the square's 320 rows: 70 of the crop's 224 when the crop holds it whole
        assert [len(rows) >= 65 for rows in rows_of] == [True] * 3, [len(rows) for rows in rows_of]


@pytest.mark.parametrize("model", ["zoo:sam2", "zoo:sam"])
def test_box_prompts_reach_the_prompt_encoder_unrounded_under_bfloat16(model):
    """bf16 steps by 4 px at 1024: boxes 1 px apart would give one prompt. They must reach the
    prompt encoder's sin/cos encoding as the exact float32 pixels (+0.5, the pixel centre)."""
    segmenter = load_role({"role": "segmenter", "backend": "transformers", "model": model, "dtype": "bfloat16"})
    encoding = segmenter.model.prompt_encoder.shared_embedding
    coords, embedded = [], []
    encoding.register_forward_pre_hook(lambda _, args: coords.append(args[0].clone()))
    segmenter.model.prompt_encoder.register_forward_hook(lambda _, args, out: embedded.append(out[0]))
    image = Image.new("RGB", (1024, 1024), (90, 120, 60))  # the model's own size: pixels are prompt pixels
    pixels = np.array([[801, 101, 903, 297], [802, 101, 903, 297]], np.float32)
    masks = segmenter.segment([image], [pixels / 1024])[0]
    assert masks.shape == (2, 1024, 1024) and masks.dtype == bool
    corners = coords[0][0, :, :2]  # (boxes, 2 corners, xy); SAM2 pads a third point
    assert corners.dtype == torch.float32
    assert torch.equal(corners.reshape(2, 4), torch.from_numpy(pixels + 0.5))
    assert embedded[0].dtype == torch.float32, "the encoding runs in float32; the decoder casts its output"
    assert not torch.equal(embedded[0][0, 0], embedded[0][0, 1]), "1 px apart, two prompts"
    assert segmenter.model.shared_image_embedding.positional_embedding.dtype == torch.bfloat16
