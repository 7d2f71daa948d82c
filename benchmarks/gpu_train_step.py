"""One MUSIC training step at real size with random weights: the planner as Qwen2.5-VL-7B-Instruct's
architecture and the renderer as FLUX.1 Kontext-dev's (transformer, T5-XXL and CLIP-L text encoders,
VAE), bf16 on one GPU, both resident as in joint training, through the training code's own
`PlannerTrainer` / `RendererTrainer` (LoRA rank 64, CE on plan tokens, flow-matching loss).

Models are `arch:` role models (`music_model.zoo.arch`: the published architectures, random weights
built directly on the GPU in bf16, no CPU initialisation, no download); the tokenizers and processors
are the tiny zoo's (the real classes and image preprocessing; token IDs index the real vocabularies).
A sample is 3 subjects with 512x512 references and a 1024x1024 target. Prints and writes JSON: per part, each step's time and the peak GPU memory.

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


def sample(reference_size: int, target_size: int):
    from PIL import Image

    from music_model.music.plan import Plan, SubjectNote
    from music_model.music.training import Sample

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
    from music_model.music.training import PlannerTrainer, RendererTrainer, set_cuda_attention
    from music_model.roles.editor import DiffusersEditor
    from music_model.roles.vlm import TransformersVLM
    from music_model.zoo.arch import TINY_SUFFIX

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    suffix = "" if args.scale == "real" else TINY_SUFFIX
    cuda = device.type == "cuda"
    spec = parse_train_spec({
        "name": "gpu-step", "dataset": None, "gradient_checkpointing": not args.no_checkpointing,
        "planner": {"backend": "transformers", "model": f"arch:qwen2_5_vl_7b{suffix}", "device": args.device,
                    "options": {"max_pixels": 512 * 512}},
        "renderer": {"backend": "diffusers", "model": f"arch:flux_kontext_dev{suffix}", "device": args.device},
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
        trainers["planner"] = PlannerTrainer(spec, TransformersVLM(spec.planner))
        result["planner_parameters_billion"] = round(sum(p.numel() for p in trainers["planner"].model.parameters()) / 1e9, 3)
    if "renderer" in parts:
        editor = DiffusersEditor(spec.renderer)
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
