"""The real models' architectures with random weights: the `arch:<name>` role models.

`ARCHES` holds, per model the shipped specs use, its hub ID and its published config values
(copied from the checkpoint's `config.json` / `model_index.json` component configs, written in the
form transformers 5 / diffusers 0.42 read). An `arch:<name>` role is that architecture built with
random weights directly on the role's device in its dtype: no download, no weights on disk, no
CPU initialisation. Benchmarks (`benchmarks/gpu_pipeline.py`, `gpu_train_step.py`) and planning
(`music plan`) use them; their outputs are noise.

`ensure_arch(name)` writes the model's folder in the real on-disk layout without weights: the
matching tiny zoo entry's tokenizers, processors, chat templates and scheduler, its configs with
the published architecture values laid over them (the zoo's special-token IDs stay, so the tiny
tokenizers' IDs index the real, larger vocabularies). `<name>-tiny` is the same structure at laptop
size: the zoo entry's own configs, for running the same code on a CPU.

`random_model` / `random_pipeline` build a transformers model / diffusers pipeline from such a
folder; `param_bytes` counts an architecture's parameter bytes on the `meta` device (no memory).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import shutil
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from safe_files import staged_folder
from music_model.paths import zoo_dir

TINY_SUFFIX = "-tiny"
_MARKER = "arch.json"
# Weight files are never copied from the zoo entry: an arch folder holds no weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# Config keys derived from others (the layer count): dropped where published values are laid over.
_DERIVED_KEYS = ("layer_types",)


@dataclass(frozen=True)
class Arch:
    """A real model: `configs` maps each config file of its folder to the published values of one
    module (self-describing: transformers `model_type` + `architectures`, diffusers `_class_name`)."""

    hub_id: str
    zoo: str  # the tiny zoo entry that lends its tokenizers/processors/scheduler and tiny configs
    configs: Mapping[str, Mapping[str, Any]]
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # what the role passes (dino: no pooler)


# --- published config values ---

QWEN3_8B = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
    max_window_layers=36, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, dtype="bfloat16",
)
QWEN2_5_VL_7B_TEXT = dict(
    model_type="qwen2_5_vl_text", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, max_window_layers=28, rms_norm_eps=1e-6,
    hidden_act="silu", tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1_000_000.0},
)
QWEN2_5_VL_7B_VISION = dict(
    model_type="qwen2_5_vl_vision", depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2, hidden_act="silu", in_channels=3,
)
QWEN2_5_VL_7B = dict(
    architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", tie_word_embeddings=False, dtype="bfloat16",
    text_config=QWEN2_5_VL_7B_TEXT, vision_config=QWEN2_5_VL_7B_VISION,
)
# FLUX.1-dev and FLUX.1-Kontext-dev share every component's architecture.
FLUX_TRANSFORMER = dict(
    _class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
FLUX_VAE = dict(
    _class_name="AutoencoderKL", in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu",
    latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True,
)
CLIP_L_TEXT = dict(
    architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=49408, hidden_size=768, intermediate_size=3072,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, dtype="bfloat16",
)
T5_XXL = dict(
    architectures=["T5EncoderModel"], model_type="t5", vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
    num_layers=24, num_decoder_layers=24, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False, dtype="bfloat16",
)
FLUX = {"transformer/config.json": FLUX_TRANSFORMER, "vae/config.json": FLUX_VAE,
        "text_encoder/config.json": CLIP_L_TEXT, "text_encoder_2/config.json": T5_XXL}
GROUNDING_DINO_BASE = dict(
    architectures=["GroundingDinoForObjectDetection"], model_type="grounding-dino", d_model=256, encoder_layers=6,
    decoder_layers=6, encoder_ffn_dim=2048, decoder_ffn_dim=2048, encoder_attention_heads=8, decoder_attention_heads=8,
    num_queries=900, max_text_len=256, num_feature_levels=4, encoder_n_points=4, decoder_n_points=4, two_stage=True,
    backbone_config=dict(  # Swin-B at 384 px
        model_type="swin", image_size=384, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12,
        hidden_size=1024, out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4],
    ),
    text_config=dict(  # bert-base-uncased
        model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
    ),
)
SAM2_1_LARGE = dict(
    architectures=["Sam2Model"], model_type="sam2",
    vision_config=dict(
        model_type="sam2_vision_model", backbone_channel_list=[1152, 576, 288, 144], fpn_hidden_size=256,
        backbone_config=dict(  # Hiera-L
            model_type="sam2_hiera_det_model", hidden_size=144, num_attention_heads=2, blocks_per_stage=[2, 6, 36, 4], embed_dim_per_stage=[144, 288, 576, 1152],
            num_attention_heads_per_stage=[2, 4, 8, 16], window_size_per_stage=[8, 4, 16, 8], global_attention_blocks=[23, 33, 43],
            window_positional_embedding_background_size=[7, 7],
        ),
    ),
    prompt_encoder_config=dict(model_type="sam2_prompt_encoder", hidden_size=256),
    mask_decoder_config=dict(model_type="sam2_mask_decoder", hidden_size=256, mlp_dim=2048, num_attention_heads=8, iou_head_hidden_dim=256),
)


def _clip(text: dict, vision: dict, projection_dim: int) -> dict:
    return dict(
        architectures=["CLIPModel"], model_type="clip", projection_dim=projection_dim,
        text_config=dict(vocab_size=49408, max_position_embeddings=77, projection_dim=projection_dim, hidden_act="quick_gelu", **text),
        vision_config=dict(image_size=224, projection_dim=projection_dim, hidden_act="quick_gelu", **vision),
    )


CLIP_L14 = _clip(dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                 dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14), 768)
CLIP_B32 = _clip(dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
                 dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32), 512)
DINO_VITS16 = dict(
    architectures=["ViTModel"], model_type="vit", hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
    intermediate_size=1536, image_size=224, patch_size=16, qkv_bias=True,
)

ARCHES: dict[str, Arch] = {
    "qwen3_8b": Arch("Qwen/Qwen3-8B", "qwen3", {"config.json": QWEN3_8B}),
    "qwen2_5_vl_7b": Arch("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", {"config.json": QWEN2_5_VL_7B}),
    "flux_dev": Arch("black-forest-labs/FLUX.1-dev", "flux", FLUX),
    "flux_kontext_dev": Arch("black-forest-labs/FLUX.1-Kontext-dev", "flux_kontext", FLUX),
    "grounding_dino_base": Arch("IDEA-Research/grounding-dino-base", "grounding_dino", {"config.json": GROUNDING_DINO_BASE}),
    "sam2_1_large": Arch("facebook/sam2.1-hiera-large", "sam2", {"config.json": SAM2_1_LARGE}),
    "clip_l14": Arch("openai/clip-vit-large-patch14", "clip_l14", {"config.json": CLIP_L14}),
    "clip_b32": Arch("openai/clip-vit-base-patch32", "clip_b32", {"config.json": CLIP_B32}),
    "dino_vits16": Arch("facebook/dino-vits16", "dino_vits16", {"config.json": DINO_VITS16}, {"add_pooling_layer": False}),
}
ARCH_BY_HUB_ID = {arch.hub_id: name for name, arch in ARCHES.items()}


def arch_names() -> list[str]:
    """Every name `ensure_arch` takes: each architecture and its `-tiny` variant."""
    return [n for name in sorted(ARCHES) for n in (name, name + TINY_SUFFIX)]


def lookup(name: str) -> tuple[Arch, bool]:
    """The architecture of `name` and whether `name` is its tiny variant."""
    base = name.removesuffix(TINY_SUFFIX)
    if base not in ARCHES:
        raise KeyError(f"no architecture {name!r}; known: {', '.join(arch_names())}")
    return ARCHES[base], name != base


def overlay(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `values` laid over it, nested dicts merged key by key; derived keys of a level
    that `values` touches are dropped (the config recomputes them)."""
    merged = {k: v for k, v in copy.deepcopy(dict(base)).items() if k not in _DERIVED_KEYS}
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = overlay(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --- the folder ---

def _digest(name: str, entry: Path) -> str:
    """What the folder is made from: the published values and the zoo entry's file hashes."""
    arch, tiny = lookup(name)
    payload = {"name": name, "configs": None if tiny else arch.configs, "zoo": (entry / "zoo_entry.json").read_text()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _write_arch(name: str, entry: Path, target: Path, digest: str) -> None:
    arch, tiny = lookup(name)
    with staged_folder(target) as staging:  # replaces a stale one: the published values or the zoo entry changed
        for source in sorted(entry.rglob("*")):
            relative = source.relative_to(entry)
            if source.is_file() and source.suffix not in _WEIGHT_SUFFIXES and source.name != "zoo_entry.json":
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, staging / relative)
        if not tiny:
            for relative, values in arch.configs.items():
                path = staging / relative
                path.write_text(json.dumps(overlay(json.loads(path.read_text()), values), indent=2, sort_keys=True) + "\n")
        (staging / _MARKER).write_text(json.dumps({"name": name, "hub_id": arch.hub_id, "digest": digest}, indent=1) + "\n")


def _current(target: Path, digest: str) -> bool:
    marker = target / _MARKER
    return marker.exists() and json.loads(marker.read_text()).get("digest") == digest


_folder_lock = threading.Lock()


def ensure_arch(name: str, root: Path | None = None) -> Path:
    """The folder of architecture `name` (configs, tokenizers, processors; no weights), written
    once under `<zoo>/arch/<name>` and rewritten when its values or its zoo entry change."""
    from music_model.zoo import ensure_entry

    arch, _ = lookup(name)
    entry = ensure_entry(arch.zoo)
    root = Path(root) if root else zoo_dir() / "arch"
    target = root / name
    digest = _digest(name, entry)
    if _current(target, digest):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _folder_lock, FileLock(str(root / f".{name}.lock")):
        if not _current(target, digest):
            _write_arch(name, entry, target, digest)
    return target


# --- random weights on a device ---

@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Process-wide, as transformers' own `_from_config(dtype=...)` does: parameters are created in
    # `dtype` rather than in float32 and then cast (twice the memory for a moment).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _transformers_model(model_class: Any, config: Any, dtype: torch.dtype, device: torch.device | str, **kwargs: Any):
    # Auto classes build through `from_config`; a concrete class through `_from_config`.
    build = model_class.from_config if hasattr(model_class, "from_config") else model_class._from_config
    with torch.device(device):
        model = build(config, dtype=dtype, **kwargs)
    # Legacy `torch.Tensor(...)` constructors ignore the device context (GroundingDINO's
    # `level_embed`): move those few; everything already on the device stays where it is.
    return model.to(device)


def _diffusers_model(model_class: Any, config: Mapping[str, Any], dtype: torch.dtype, device: torch.device | str):
    with _default_dtype(dtype), torch.device(device):
        model = model_class.from_config(dict(config))
    return model.to(device)


def random_model(model_class: Any, path: str | Path, dtype: torch.dtype, device: torch.device | str, **kwargs: Any):
    """A transformers model of the folder's config, random weights created on `device` in
    `dtype`, in eval mode; `kwargs` go to the model class (as to `from_pretrained`)."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    model = _transformers_model(model_class, config, dtype, device, **kwargs)
    if model.can_generate() and (Path(path) / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def random_pipeline(path: str | Path, dtype: torch.dtype, device: torch.device | str):
    """The diffusers pipeline of the folder's `model_index.json`: every model component built from
    its config with random weights on `device` in `dtype`, tokenizers and scheduler loaded."""
    import diffusers
    import transformers

    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    components: dict[str, Any] = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        library, class_name = value
        if library is None:  # an optional component the checkpoint does not ship
            components[name] = None
            continue
        component_class = getattr(importlib.import_module(library), class_name)
        folder = path / name
        if isinstance(component_class, type) and issubclass(component_class, transformers.PreTrainedModel):
            components[name] = random_model(component_class, folder, dtype, device)
        elif isinstance(component_class, type) and issubclass(component_class, torch.nn.Module):
            components[name] = _diffusers_model(component_class, component_class.load_config(folder), dtype, device).eval()
        else:  # tokenizers, schedulers, processors: small files, loaded as they are
            components[name] = component_class.from_pretrained(folder)
    return getattr(diffusers, index["_class_name"])(**components)


# --- sizes without memory ---

def module_configs(name: str) -> dict[str, dict[str, Any]]:
    """Config values of each model module of `name`, by config file (the tiny variant's from its folder)."""
    arch, tiny = lookup(name)
    if not tiny:
        return {relative: dict(values) for relative, values in arch.configs.items()}
    folder = ensure_arch(name)
    return {relative: json.loads((folder / relative).read_text()) for relative in arch.configs}


def build_module(values: Mapping[str, Any], dtype: torch.dtype, device: torch.device | str, **kwargs: Any) -> torch.nn.Module:
    """One module from self-describing config values (diffusers `_class_name`, else transformers
    `model_type` + `architectures`), random weights on `device` in `dtype`."""
    if "_class_name" in values:
        import diffusers

        return _diffusers_model(getattr(diffusers, values["_class_name"]), values, dtype, device)
    import transformers

    config = transformers.AutoConfig.for_model(**values)
    return _transformers_model(getattr(transformers, values["architectures"][0]), config, dtype, device, **kwargs)


@lru_cache(maxsize=None)
def _meta_sizes(name: str, dtype: torch.dtype) -> tuple[int, int]:
    arch, _ = lookup(name)
    count = size = 0
    for relative, values in module_configs(name).items():
        kwargs = arch.model_kwargs if relative == "config.json" else {}
        module = build_module(values, dtype, "meta", **kwargs)
        for parameter in module.parameters():
            count += parameter.numel()
            size += parameter.numel() * parameter.element_size()
    return count, size


def param_count(name: str) -> int:
    """Parameters of architecture `name` (every model module; tied weights once)."""
    return _meta_sizes(name, torch.float32)[0]


def param_bytes(name: str, dtype: torch.dtype) -> int:
    """Exact parameter bytes of architecture `name` in `dtype`, from instantiating it on the `meta`
    device (no memory, no weights)."""
    return _meta_sizes(name, dtype)[1]
