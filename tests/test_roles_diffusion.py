"""The t2i and editor roles on the tiny FLUX.1 / FLUX.1 Kontext zoo pipelines."""
import numpy as np
import pytest
from PIL import Image

from music_model.roles import load_role

T2I = {"role": "t2i", "backend": "diffusers", "model": "zoo:flux", "batch_size": 2,
       "options": {"num_inference_steps": 2}}
EDITOR = {"role": "editor", "backend": "diffusers", "model": "zoo:flux_kontext", "batch_size": 2,
          "options": {"num_inference_steps": 2}}


@pytest.fixture(scope="module")
def t2i():
    return load_role(T2I)


@pytest.fixture(scope="module")
def editor():
    return load_role(EDITOR)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def assert_rgb_images(images, size):
    for image in images:
        assert isinstance(image, Image.Image)
        assert image.mode == "RGB"
        assert image.size == size
        assert pixels(image).std() > 0  # decoded from latents, not a blank canvas


def test_zoo_pipelines_keep_flux_geometry(t2i, editor):
    assert type(t2i.pipeline).__name__ == "FluxPipeline"
    assert type(editor.pipeline).__name__ == "FluxKontextPipeline"
    for pipeline in (t2i.pipeline, editor.pipeline):
        assert pipeline.vae.config.latent_channels == 16
        assert pipeline.vae_scale_factor == 8
        assert pipeline.transformer.config.in_channels == 64  # 16 channels packed 2x2
        assert pipeline.scheduler.config.use_dynamic_shifting
        assert pipeline.tokenizer.model_max_length == 77
        assert pipeline.tokenizer_2.model_max_length == 512


def test_t2i_returns_one_rgb_image_per_prompt_at_the_requested_size(t2i):
    images = t2i.generate(["a red dog", "a cat on a sofa", "a lamp in a room"], [1, 2, 3], width=64, height=96)
    assert len(images) == 3  # two batches of at most batch_size 2
    assert_rgb_images(images, (64, 96))


def test_t2i_seed_alone_determines_the_image(t2i):
    first = t2i.generate(["a red dog", "a red dog"], [5, 6], 64, 64)
    again = t2i.generate(["a red dog", "a red dog"], [5, 6], 64, 64)
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert np.array_equal(pixels(first[1]), pixels(again[1]))
    assert np.abs(pixels(first[0]) - pixels(first[1])).mean() > 5
    # Noise is drawn per sample, so another batch composition changes only float rounding (<= 1 level on CPU).
    alone = t2i.generate(["a red dog"], [6], 64, 64)[0]
    assert np.abs(pixels(alone) - pixels(first[1])).max() <= 2


@pytest.mark.parametrize("width, height", [(60, 64), (64, 0), (64.0, 64)])
def test_t2i_rejects_sizes_the_pipeline_cannot_render(t2i, width, height):
    with pytest.raises(ValueError, match="multiples of 16 for FluxPipeline"):
        t2i.generate(["a red dog"], [1], width, height)


def test_t2i_rejects_mismatched_prompts_and_seeds(t2i):
    with pytest.raises(ValueError, match="got 2 prompts, 1 seeds"):
        t2i.generate(["a", "b"], [1], 64, 64)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_inference_step": 2}, "options.num_inference_step: FluxPipeline.__call__ takes no such argument"),
        ({"width": 64}, "options.width: set by the t2i role itself"),
        ({"max_sequence_length": 1024}, "options.max_sequence_length: 1024 exceeds the T5Tokenizer limit of 512"),
    ],
)
def test_t2i_rejects_bad_options_at_load(options, message):
    with pytest.raises(ValueError, match=message):
        load_role({**T2I, "options": options})


def test_editor_output_keeps_the_input_size(editor):
    images = [noise_image(64, 96, 0), noise_image(64, 96, 1)]
    edited = editor.edit(images, ["make it blue", "turn it around"], [1, 2])
    assert len(edited) == 2
    assert_rgb_images(edited, (64, 96))  # not Kontext's default ~1024² resize


def test_editor_rounds_default_sizes_and_keeps_order(editor):
    wide, tall = noise_image(100, 70, 0), noise_image(64, 96, 1)
    edited = editor.edit([wide, tall, wide], ["a", "b", "c"], [1, 2, 3])
    assert [image.size for image in edited] == [(96, 64), (64, 96), (96, 64)]


def test_editor_renders_an_explicit_size(editor):
    edited = editor.edit([noise_image(64, 96, 0)], ["a red dog"], [1], width=128, height=32)
    assert_rgb_images(edited, (128, 32))


def test_editor_seed_alone_determines_the_image(editor):
    image = noise_image(64, 64, 0)
    first = editor.edit([image, image], ["turn it", "turn it"], [7, 8])
    again = editor.edit([image, image], ["turn it", "turn it"], [7, 8])
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert np.array_equal(pixels(first[1]), pixels(again[1]))
    assert np.abs(pixels(first[0]) - pixels(first[1])).mean() > 5
    alone = editor.edit([image], ["turn it"], [8])[0]
    assert np.abs(pixels(alone) - pixels(first[1])).max() <= 2


def test_editor_rejects_a_bad_size(editor):
    with pytest.raises(ValueError, match="multiples of 16 for FluxKontextPipeline; got 50x96"):
        editor.edit([noise_image(64, 96, 0)], ["a"], [1], width=50)
