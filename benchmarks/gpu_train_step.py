"""One MUSIC training step at real size with random weights: the planner as Qwen2.5-VL-7B-Instruct's
architecture and the renderer as FLUX.1 Kontext-dev's (transformer, T5-XXL and CLIP-L text encoders,
VAE), bf16 on one GPU, both resident as in joint training, through the training code's own
`PlannerTrainer` / `RendererTrainer` (LoRA rank 64, CE on plan tokens, flow-matching loss).

Models are built directly on the GPU in bf16 (no CPU initialisation, no download); the tokenizers
and processors are the tiny zoo's (the real classes and image preprocessing; token IDs are mapped
into the real vocabularies). A sample is 3 subjects with 512x512 references and a 1024x1024 target.
Prints and writes JSON: per part, each step's time and the peak GPU memory.

    python benchmarks/gpu_train_step.py --out /tmp/step.json              # on a GPU machine
    python benchmarks/gpu_train_step.py --scale tiny --device cpu          # the same code path, tiny
    CUDA_LAUNCH_BLOCKING=1 python benchmarks/gpu_train_step.py --parts planner   # one model, faults located
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

QWEN2_5_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                          rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1_000_000.0})
QWEN2_5_VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                            spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
FLUX_KONTEXT = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=32, relative_attention_max_distance=128)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
FLUX_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)

# The same structure at laptop size, to check the code path on a CPU.
TINY = {
    "text": dict(QWEN2_5_VL_7B_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
    "vision": dict(QWEN2_5_VL_7B_VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   fullatt_block_indexes=[1]),
    "flux": dict(FLUX_KONTEXT, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
    "t5": dict(T5_XXL, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=1),
    "clip": dict(CLIP_L_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=32),
    "vae": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
}
REAL = {"text": QWEN2_5_VL_7B_TEXT, "vision": QWEN2_5_VL_7B_VISION, "flux": FLUX_KONTEXT, "t5": T5_XXL, "clip": CLIP_L_TEXT, "vae": FLUX_VAE}


def build_on(device: torch.device, dtype: torch.dtype, make):
    """`make()` with parameters created directly on `device` in `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(previous)


def planner_model(sizes: dict, zoo_config, device, dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = zoo_config.text_config
    ids = {k: getattr(zoo_config, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = Qwen2_5_VLConfig(
        text_config=dict(sizes["text"], bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
                         tie_word_embeddings=False),
        vision_config=sizes["vision"], tie_word_embeddings=False, **ids)
    return build_on(device, dtype, lambda: Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)).eval()


def renderer_components(sizes: dict, device, dtype) -> dict:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    def make():
        return {
            "transformer": FluxTransformer2DModel(**sizes["flux"]),
            "text_encoder_2": T5EncoderModel._from_config(T5Config(**sizes["t5"]), dtype=dtype),
            "text_encoder": CLIPTextModel._from_config(CLIPTextConfig(**sizes["clip"]), dtype=dtype),
            "vae": AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, sample_size=1024,
                                 scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                                 **sizes["vae"]),
        }

    return {k: v.eval() for k, v in build_on(device, dtype, make).items()}


def sample(reference_size: int, target_size: int):
    from PIL import Image

    from music_model.planner import Plan, SubjectNote
    from music_model.training import Sample

    layout = [0] * 64
    for cell in (9, 10, 17, 18):
        layout[cell] = 1
    for cell in (13, 14, 21, 22, 29, 30):
        layout[cell] = 2
    for cell in (42, 43, 44, 50, 51, 52):
        layout[cell] = 3
    notes = (SubjectNote(1, "a brown dog sitting on the grass", "top left of the image"),
             SubjectNote(2, "a red ball in mid air", "top right of the image"),
             SubjectNote(3, "a wooden bench under a tree", "bottom center of the image"))
    plan = Plan(notes, ("<s1> looks at <s2>", "<s3> stands behind <s1>"), tuple(layout))
    references = [Image.new("RGB", (reference_size, reference_size), color) for color in ((120, 80, 40), (200, 20, 20), (140, 100, 60))]
    return Sample("bench", Image.new("RGB", (target_size, target_size), (90, 160, 90)), references,
                  "A photo of <s1> playing with <s2> in a park, with <s3> behind them, in warm evening light.", ["dog", "ball", "bench"], plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("real", "tiny"), default="real")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--references", type=int, default=512)
    parser.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    parser.add_argument("--parts", default="planner,renderer", help="which models to build and step (comma-separated)")
    parser.add_argument("--cudnn-attention", action="store_true", help="allow PyTorch's cuDNN SDPA kernels (training turns them off)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("MUSIC_HOME", tempfile.mkdtemp(prefix="music-bench-"))
    from collections import Counter

    from data_specs.train import parse_train_spec
    from music_model.roles.editor import DiffusersEditor
    from music_model.roles.vlm import TransformersVLM
    from music_model.training import PlannerTrainer, RendererTrainer, set_cuda_attention

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = REAL if args.scale == "real" else TINY
    cuda = device.type == "cuda"
    spec = parse_train_spec({
        "name": "gpu-step", "dataset": None, "gradient_checkpointing": not args.no_checkpointing,
        "planner": {"backend": "transformers", "model": "zoo:qwen2_5_vl", "device": args.device, "options": {"max_pixels": 512 * 512}},
        "renderer": {"backend": "diffusers", "model": "zoo:flux_kontext", "device": args.device},
        "render": {"width": args.resolution, "height": args.resolution},
        "plan": {"max_seq_len": 8192}, "cudnn_attention": args.cudnn_attention,
    })
    set_cuda_attention(spec)
    result = {"scale": args.scale, "device": torch.cuda.get_device_name(0) if cuda else "cpu", "dtype": str(dtype),
              "gradient_checkpointing": spec.gradient_checkpointing, "cudnn_attention": spec.cudnn_attention,
              "resolution": args.resolution, "references": args.references,
              "lora": {"rank": spec.lora.rank, "alpha": spec.lora.alpha}, "torch": torch.__version__}

    def memory() -> float:
        return round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else 0.0

    parts = args.parts.split(",")
    started = time.perf_counter()
    trainers = {}
    if "planner" in parts:
        vlm = TransformersVLM(spec.planner)
        vlm.model = planner_model(sizes, vlm.model.config, device, dtype)
        trainers["planner"] = PlannerTrainer(spec, vlm)
        result["planner_parameters_billion"] = round(sum(p.numel() for p in trainers["planner"].model.parameters()) / 1e9, 3)
    if "renderer" in parts:
        editor = DiffusersEditor(spec.renderer)
        for name, component in renderer_components(sizes, device, dtype).items():
            setattr(editor.pipeline, name, component)
        trainers["renderer"] = RendererTrainer(spec, editor)
        result["renderer_parameters_billion"] = {
            name: round(sum(p.numel() for p in getattr(editor.pipeline, name).parameters()) / 1e9, 3)
            for name in ("transformer", "text_encoder_2", "text_encoder", "vae")}
    result["build_seconds"] = round(time.perf_counter() - started, 1)
    result["weights_gib"] = memory()
    result["lora_parameters_million"] = {name: round(sum(p.numel() for p in t.parameters()) / 1e6, 1) for name, t in trainers.items()}
    optimizer = torch.optim.AdamW([{"params": t.parameters()} for t in trainers.values()], lr=1e-4)
    item = sample(args.references if args.scale == "real" else 64, args.resolution)
    if "planner" in trainers:
        example = trainers["planner"].example(item)
        result["planner_tokens"] = int(example["input_ids"].shape[0])
        result["planner_plan_tokens"] = int((example["labels"] != -100).sum())
    steps = []
    for step in range(args.steps):
        record = {"step": step + 1}
        optimizer.zero_grad(set_to_none=True)
        for name, trainer in trainers.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            begin = time.perf_counter()
            phase = "forward"
            try:
                if name == "planner":
                    loss = trainer.loss([item], Counter())
                else:
                    loss = trainer.loss([item], torch.Generator("cpu").manual_seed(step))
                if cuda:
                    torch.cuda.synchronize()  # a kernel fault shows in the phase that caused it
                phase = "backward"
                (0.5 * loss).backward()
                if cuda:
                    torch.cuda.synchronize()
            except Exception:
                print(f"FAILED: {name} {phase}, step {step + 1}", flush=True)
                raise
            record[f"{name}_seconds"] = round(time.perf_counter() - begin, 3)
            record[f"{name}_loss"] = round(loss.item(), 4)
            record[f"{name}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0
        begin = time.perf_counter()
        torch.nn.utils.clip_grad_norm_([p for t in trainers.values() for p in t.parameters()], 1.0)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        record["optimizer_seconds"] = round(time.perf_counter() - begin, 3)
        record["allocated_after_gib"] = memory()
        steps.append(record)
        print(json.dumps(record), flush=True)
    result["steps"] = steps
    if cuda:
        result["max_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
