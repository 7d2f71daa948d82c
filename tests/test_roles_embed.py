"""The clip and dino roles on the tiny zoo, and the DreamBench evaluation-protocol preprocessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import load_file

from data_specs.roles import SpecError
from music_model.media.preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, clip_transform, dino_transform
from music_model.roles import load_role
from music_model.zoo import ensure_entry

CLIP_SPECS = {
    "transformers-b32": {"role": "clip", "backend": "transformers", "model": "zoo:clip_b32"},
    "transformers-l14": {"role": "clip", "backend": "transformers", "model": "zoo:clip_l14"},
    "open_clip-b32": {"role": "clip", "backend": "open_clip", "model": "zoo:open_clip_b32"},
}
DINO_SPEC = {"role": "dino", "backend": "transformers", "model": "zoo:dino_vits16"}
EMBED_SPECS = {**CLIP_SPECS, "dino": DINO_SPEC}
# float32 on the CPU: the tolerances below are float32 ones
COMMON = {"device": "cpu", "dtype": "float32", "batch_size": 2}


def role_for(name: str):
    return load_role({**EMBED_SPECS[name], **COMMON})


@pytest.fixture(scope="module")
def images(dreambench_dir) -> list[Image.Image]:
    """Three real DreamBench photos of three different subjects."""
    return [Image.open(dreambench_dir / subject / "00.jpg") for subject in ("dog", "backpack", "teapot")]


@pytest.fixture(scope="module")
def odd_images(images) -> list[Image.Image]:
    """Non-square crops and non-RGB modes. 454x448 resizes to 227x224 (CLIP) and 259x256 (DINO):
    crop margins of 1.5 and 17.5 px, where torchvision's round-half-to-even differs from floor."""
    photo = images[0]
    return [
        photo.crop((0, 0, 454, 448)),
        photo.crop((13, 40, 461, 494)),
        photo.crop((0, 0, 701, 523)),
        photo.convert("L"),
        photo.convert("RGBA"),
        photo.convert("P"),
    ]


def torchvision_pipeline(resize: int, crop: int, mean, std) -> T.Compose:
    return T.Compose(
        [T.Resize(resize, T.InterpolationMode.BICUBIC), T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, std)]
    )


# --- preprocessing -----------------------------------------------------------------------------


def test_dino_transform_equals_hand_computed_protocol(images):
    photo = images[0]
    assert photo.width == photo.height  # DreamBench photos are square: 256x256, then a 16 px margin
    pixels = np.asarray(photo.resize((256, 256), Image.Resampling.BICUBIC), dtype=np.float32)[16:240, 16:240]
    expected = ((pixels / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32))
    out = dino_transform([photo])
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), expected, atol=1e-6, rtol=0)


def test_clip_transform_equals_hand_computed_protocol(images):
    photo = images[1]
    pixels = np.asarray(photo.resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float32)
    expected = (pixels / 255.0 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    out = clip_transform([photo])
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (dino_transform, torchvision_pipeline(256, 224, IMAGENET_MEAN, IMAGENET_STD)),
        (clip_transform, torchvision_pipeline(224, 224, CLIP_MEAN, CLIP_STD)),
    ],
    ids=["dino", "clip"],
)
def test_transforms_equal_torchvision(images, odd_images, ours, theirs):
    batch = images + odd_images
    expected = torch.stack([theirs(image.convert("RGB")) for image in batch])
    out = ours(batch)
    assert out.shape == (len(batch), 3, 224, 224)
    assert (out - expected).abs().max().item() <= 1e-6


def test_transforms_reject_what_is_not_an_image(images):
    with pytest.raises(TypeError, match="image 1: expected a PIL.Image"):
        dino_transform([images[0], np.zeros((224, 224, 3), np.uint8)])
    assert clip_transform([]).shape == (0, 3, 224, 224)


# --- roles ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EMBED_SPECS))
def test_image_embeddings_are_unit_float32_and_distinct(name, images):
    out = role_for(name).embed_images(images[:2])
    assert out.dtype == np.float32 and out.ndim == 2 and out.shape[0] == 2
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert float(out[0] @ out[1]) < 1 - 1e-4  # two different photos are not the same point


@pytest.mark.parametrize("name", sorted(EMBED_SPECS))
def test_image_against_itself_and_batch_composition(name, images):
    role = role_for(name)
    dog, backpack, teapot = images
    together = role.embed_images([dog, backpack, teapot])  # chunks [dog, backpack], [teapot]
    alone = role.embed_images([dog])
    shuffled = role.embed_images([teapot, dog])
    assert abs(float(together[0] @ alone[0]) - 1.0) <= 1e-6
    np.testing.assert_allclose(together[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(together[0], shuffled[1], atol=1e-5)
    np.testing.assert_allclose(together[2], shuffled[0], atol=1e-5)


@pytest.mark.parametrize("name", sorted(CLIP_SPECS))
def test_text_embeddings_are_unit_and_independent_of_padding(name):
    role = role_for(name)
    texts = ["a photo of a dog", "a red backpack on a wooden table in the kitchen", "a teapot"]
    out = role.embed_texts(texts)
    assert out.dtype == np.float32 and out.shape == (3, role.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert float(out[0] @ out[1]) < 1 - 1e-4
    # "a photo of a dog" is padded to the long text's length in the first chunk, not at all alone
    np.testing.assert_allclose(out[0], role.embed_texts(texts[:1])[0], atol=1e-5)
    assert role.embed_texts([]).shape == (0, role.embed_dim)
    with pytest.raises(TypeError, match="text 0: expected a str"):
        role.embed_texts([3])


@pytest.mark.parametrize("name", sorted(CLIP_SPECS))
def test_clip_text_and_image_share_one_space(name, images):
    role = role_for(name)
    assert role.embed_images(images[:1]).shape[1] == role.embed_texts(["a dog"]).shape[1] == role.embed_dim


def test_dino_embeds_protocol_pixels_through_cls_token(images):
    role = role_for("dino")
    assert role.image_size == 224
    with torch.inference_mode():
        cls = role.model(pixel_values=dino_transform(images[:1])).last_hidden_state[:, 0]
    expected = torch.nn.functional.normalize(cls, dim=-1).numpy()
    np.testing.assert_allclose(role.embed_images(images[:1]), expected, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CLIP_SPECS))
def test_clip_preprocessing_comes_from_the_checkpoint(name, images):
    role = role_for(name)
    assert (role.image_size, role.image_mean, role.image_std) == (224, CLIP_MEAN, CLIP_STD)
    assert role.resample == Image.Resampling.BICUBIC
    pixels = clip_transform(images[:1])
    with torch.inference_mode():
        if name.startswith("transformers"):
            features = role.model.get_image_features(pixel_values=pixels).pooler_output
        else:
            features = role.model.encode_image(pixels)
    expected = torch.nn.functional.normalize(features, dim=-1).numpy()
    np.testing.assert_allclose(role.embed_images(images[:1]), expected, atol=1e-6)


def test_open_clip_loads_the_saved_weights(zoo_root):
    role = role_for("open_clip-b32")
    saved = load_file(zoo_root / "open_clip_b32" / "open_clip_model.safetensors")
    loaded = role.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)


@pytest.mark.parametrize("name", ["clip_b32", "clip_l14", "open_clip_b32", "dino_vits16"])
def test_zoo_entries_are_small(name):
    folder = ensure_entry(name)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert 0 < size < 8e6


@pytest.mark.parametrize("name", sorted(EMBED_SPECS))
def test_unknown_option_is_rejected(name):
    with pytest.raises(SpecError, match="options.bogus"):
        load_role({**EMBED_SPECS[name], **COMMON, "options": {"bogus": 1}})
