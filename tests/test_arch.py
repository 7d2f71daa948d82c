"""`arch:` models: the real architectures' published sizes, their weightless folders, random
weights built on a device (real size on `meta`, tiny on the CPU) and every role loading a tiny arch."""
import json

import pytest
import torch

from music_model.zoo.arch import ARCH_BY_HUB_ID, ARCHES, TINY_SUFFIX, ensure_arch, param_bytes, param_count, random_model, random_pipeline

# Published parameter counts (model cards / checkpoint headers); SAM 2.1's 224M includes the video
# memory modules that the image model (Sam2Model) does not have.
PUBLISHED_PARAMS = {
    "qwen3_8b": 8.19e9, "qwen2_5_vl_7b": 8.29e9, "flux_dev": 11.90e9 + 4.76e9 + 0.123e9 + 0.084e9,
    "grounding_dino_base": 233e6, "sam2_1_large": 217e6, "clip_l14": 427.6e6, "clip_b32": 151.3e6, "dino_vits16": 21.7e6,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_the_published_models(name):
    assert param_count(name) == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)


def test_param_bytes_follow_the_dtype():
    count = param_count("clip_b32")
    assert param_bytes("clip_b32", torch.bfloat16) == 2 * count
    assert param_bytes("clip_b32", torch.float32) == 4 * count
    assert param_count("flux_kontext_dev") == param_count("flux_dev")  # one architecture, two checkpoints


def test_every_shipped_hub_model_has_an_arch():
    from tasks.stages import load_build_spec

    spec = load_build_spec("music_10k.yaml")
    assert {role.model for role in spec.roles.values()} <= set(ARCH_BY_HUB_ID)


def test_folder_has_the_published_config_the_zoo_tokenizer_and_no_weights(zoo_root):
    folder = ensure_arch("qwen2_5_vl_7b")
    assert folder == zoo_root / "arch" / "qwen2_5_vl_7b"
    assert not [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pth")]
    config = json.loads((folder / "config.json").read_text())
    zoo = json.loads((zoo_root / "qwen2_5_vl" / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 3584 and config["vision_config"]["depth"] == 32
    assert "layer_types" not in config["text_config"]  # derived from the 2 tiny layers: recomputed for 28
    assert config["image_token_id"] == zoo["image_token_id"]  # the zoo tokenizer's IDs index the real vocabulary
    from transformers import AutoConfig, AutoProcessor

    assert AutoConfig.from_pretrained(folder).text_config.num_hidden_layers == 28
    assert AutoProcessor.from_pretrained(folder).tokenizer.convert_tokens_to_ids("<|image_pad|>") == zoo["image_token_id"]


def test_folder_is_written_once_and_rewritten_when_stale():
    folder = ensure_arch("dino_vits16")
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert ensure_arch("dino_vits16") == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    marker = folder / "arch.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "digest": "old values"}))
    (folder / "config.json").write_text("{}")
    assert json.loads((ensure_arch("dino_vits16") / "config.json").read_text())["hidden_size"] == 384


def test_unknown_arch_names_the_known_ones():
    with pytest.raises(KeyError, match="qwen3_8b, qwen3_8b-tiny"):
        ensure_arch("qwen4")


def test_real_size_models_build_on_meta_with_the_role_classes():
    """What the roles build on a GPU, built on `meta`: every real folder is read by the role's class."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMaskGeneration, AutoModelForZeroShotObjectDetection, CLIPModel, ViTModel

    classes = {"qwen3_8b": (AutoModelForCausalLM, {}), "qwen2_5_vl_7b": (AutoModelForImageTextToText, {}),
               "grounding_dino_base": (AutoModelForZeroShotObjectDetection, {}), "sam2_1_large": (AutoModelForMaskGeneration, {}),
               "clip_l14": (CLIPModel, {}), "dino_vits16": (ViTModel, {"add_pooling_layer": False})}
    for name, (model_class, kwargs) in classes.items():
        model = random_model(model_class, ensure_arch(name), torch.bfloat16, "meta", **kwargs)
        parameters = list(model.parameters())
        assert {p.device.type for p in parameters} == {"meta"} and {p.dtype for p in parameters} == {torch.bfloat16}
        assert sum(p.numel() for p in parameters) == param_count(name), name
        assert not model.training
    pipeline = random_pipeline(ensure_arch("flux_kontext_dev"), torch.bfloat16, "meta")
    assert type(pipeline).__name__ == "FluxKontextPipeline"
    modules = [c for c in pipeline.components.values() if isinstance(c, torch.nn.Module)]
    assert sum(p.numel() for m in modules for p in m.parameters()) == param_count("flux_kontext_dev")
    assert pipeline.transformer.config.num_single_layers == 38 and pipeline.vae_scale_factor == 8


def test_tiny_pipeline_generates_on_cpu_in_the_requested_dtype():
    pipeline = random_pipeline(ensure_arch("flux_dev" + TINY_SUFFIX), torch.bfloat16, "cpu")
    assert pipeline.transformer.dtype == torch.bfloat16 and pipeline.text_encoder_2.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32  # restored after the build
    image = pipeline("a red dog", num_inference_steps=2, width=64, height=64, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_every_role_loads_and_runs_a_tiny_arch():
    """Through the registry (`load_role`), with the role interfaces a stage uses."""
    from data_specs.roles import parse_role_spec
    from music_model.roles import load_role
    from music_model.roles.smoke import check_roles, zoo_role_specs

    by_zoo = {arch.zoo: name for name, arch in ARCHES.items()}
    specs = {
        key: parse_role_spec({**spec.model_dump(), "model": f"arch:{by_zoo[spec.model.removeprefix('zoo:')]}{TINY_SUFFIX}"})
        for key, spec in zoo_role_specs().items() if spec.model.removeprefix("zoo:") in by_zoo
    }
    assert {spec.role for spec in specs.values()} == {"llm", "vlm", "t2i", "editor", "detector", "segmenter", "clip", "dino"}
    rows = check_roles(specs)
    assert [row["name"] for row in rows if not row["ok"]] == [], rows
    assert all(load_role(spec).random_weights for spec in specs.values())


def test_real_size_forwards_hold_together_on_meta():
    """Shapes through the real architectures' forwards on `meta` (no compute, no memory): the
    published values are mutually consistent (heads, rope sections, FLUX's packed latents, Hiera windows)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskGeneration, CLIPModel

    meta = {"device": "meta", "dtype": torch.bfloat16}
    llm = random_model(AutoModelForCausalLM, ensure_arch("qwen3_8b"), torch.bfloat16, "meta")
    assert llm(input_ids=torch.zeros(2, 64, dtype=torch.long, device="meta")).logits.shape == (2, 64, 151936)
    flux = random_pipeline(ensure_arch("flux_dev"), torch.bfloat16, "meta")
    # 1024 px: a 128x128x16 latent packed 2x2 into 4096 tokens of 64 channels, 512 T5 tokens
    sample = flux.transformer(
        hidden_states=torch.zeros(1, 4096, 64, **meta), encoder_hidden_states=torch.zeros(1, 512, 4096, **meta),
        pooled_projections=torch.zeros(1, 768, **meta), timestep=torch.ones(1, device="meta"),
        guidance=torch.ones(1, device="meta"), img_ids=torch.zeros(4096, 3, device="meta"),
        txt_ids=torch.zeros(512, 3, device="meta")).sample
    assert sample.shape == (1, 4096, 64)
    assert flux.vae.decode(torch.zeros(1, 16, 128, 128, **meta)).sample.shape == (1, 3, 1024, 1024)
    sam = random_model(AutoModelForMaskGeneration, ensure_arch("sam2_1_large"), torch.bfloat16, "meta")
    masks = sam(pixel_values=torch.zeros(1, 3, 1024, 1024, **meta), input_boxes=torch.zeros(1, 2, 4, **meta),
                multimask_output=False).pred_masks
    assert masks.shape == (1, 2, 1, 256, 256)
    clip = random_model(CLIPModel, ensure_arch("clip_l14"), torch.bfloat16, "meta")
    assert clip.get_image_features(pixel_values=torch.zeros(2, 3, 224, 224, **meta)).pooler_output.shape == (2, 768)
