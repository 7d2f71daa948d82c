"""Pass@N strategies against `full` at real size on one GPU: renders and seconds per case, side by side.

The model is `train_music.yaml` (planner Qwen2.5-VL-7B-Instruct, renderer FLUX.1 Kontext-dev at
1024 px and 28 steps) with each model replaced by its `arch:` twin (`music_model.zoo.arch`: the
published architecture, random weights built on the GPU in bf16), the selector the eval spec's
CLIP ViT-L/14 twin. A few synthetic cases (noise references, 2-4 subjects) go through
`MusicModel.generate` once per strategy, `full` first: every strategy really runs (nothing is
replayed), so the seconds include the step-wise loop's own overhead (one candidate per transformer
call, previews decoded and scored). Random weights make the pictures noise; renders, steps and
seconds are what a real checkpoint of the same architecture costs.

    python benchmarks/passn_strategies.py --out /tmp/passn_strategies.json    # one GPU, a few minutes
    python benchmarks/passn_strategies.py --tiny                               # the same code, tiny, on the CPU
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_specs.eval import load_eval_spec  # noqa: E402
from data_specs.train import load_train_spec, parse_train_spec  # noqa: E402
from music_model.music.model import GenerationCase, MusicModel  # noqa: E402
from music_model.zoo.arch import ARCH_BY_HUB_ID, ARCHES, TINY_SUFFIX  # noqa: E402

STRATEGIES = ("full", "screen", "prune", "screen_prune")


def arch_model(model: str, tiny: bool) -> str:
    by_zoo = {arch.zoo: name for name, arch in ARCHES.items()}
    name = by_zoo.get(model.removeprefix("zoo:")) if model.startswith("zoo:") else ARCH_BY_HUB_ID.get(model)
    if name is None:
        raise SystemExit(f"{model} has no arch entry (music_model/zoo/arch.py)")
    return f"arch:{name}{TINY_SUFFIX if tiny else ''}"


def bench_spec(args: argparse.Namespace):
    base = load_train_spec("train_tiny.yaml" if args.tiny else "train_music.yaml").model_dump()
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    for key in ("planner", "renderer"):
        base[key] |= {"model": arch_model(base[key]["model"], args.tiny), "device": args.device, "dtype": dtype}
    if args.steps:
        base["renderer"]["options"] = {**base["renderer"]["options"], "num_inference_steps": args.steps}
    if args.size:
        base["render"] |= {"width": args.size, "height": args.size}
    return parse_train_spec(base, source="bench")


def synthetic_cases(count: int, seed: int) -> list[GenerationCase]:
    rng = np.random.default_rng(seed)
    names = ["dog", "teapot", "backpack", "vase"]
    cases = []
    for c in range(count):
        n = 2 + c % 3
        refs = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(n)]
        tags = " and ".join(f"<s{k + 1}>" for k in range(n))
        cases.append(GenerationCase(f"case-{c}", f"{tags} on a wooden table in a garden", refs, names[:n]))
    return cases


def run(args: argparse.Namespace) -> dict:
    import torch

    from music_model.roles import load_role
    from music_model.scoring.metrics import Scorer

    spec = bench_spec(args)
    select = load_eval_spec("eval_tiny.yaml" if args.tiny else "eval_dreambench.yaml").roles["clip_select"].model_dump()
    select |= {"model": arch_model(select["model"], args.tiny), "device": args.device}
    selector = Scorer(None, None, load_role(select)).selection_scores
    model = MusicModel.from_spec(spec)
    cases = synthetic_cases(args.cases, args.seed)
    steps = int(model.renderer.editor.call_options["num_inference_steps"])
    knobs = {"screen_keep": max(1, args.candidates // 4), "prune_at": [max(0, steps // 4 - 1)], "prune_fraction": 0.25}
    model.generate(cases[:1], 1, args.seed)  # warm-up: kernels, allocator
    rows = []
    for name in STRATEGIES:
        strategy = spec.generation.model_copy(update={"strategy": name, **knobs})
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        made = model.generate(cases, args.candidates, args.seed, strategy, selector)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        ledgers = [group[0].cost for group in made]
        rows.append({"strategy": name, "seconds_per_case": seconds / len(cases),
                     "renders_per_case": float(np.mean([sum(c.image is not None for c in g) for g in made])),
                     "denoise_steps_per_case": float(np.mean([led["denoise_steps"] for led in ledgers])),
                     "decodes_per_case": float(np.mean([led["decodes"] for led in ledgers])),
                     "selector_calls_per_case": float(np.mean([led["selector_calls"] for led in ledgers]))})
    full = rows[0]
    for row in rows:
        row["seconds_vs_full"] = row["seconds_per_case"] / full["seconds_per_case"]
        row["renders_vs_full"] = row["renders_per_case"] / full["renders_per_case"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    return {"device": device, "tiny": args.tiny, "cases": len(cases), "candidates": args.candidates, "steps": steps,
            "size": spec.render.width, "knobs": knobs, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny arch twins on the CPU")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the spec's; --tiny 8)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the spec's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the result JSON here")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.tiny and args.steps is None:
        args.steps = 8
    result = run(args)
    print(f"{result['device']}: {result['cases']} cases, N = {result['candidates']}, {result['steps']} steps at {result['size']} px; "
          f"screen keeps {result['knobs']['screen_keep']}, prune keeps {result['knobs']['prune_fraction']:g} after step {result['knobs']['prune_at'][0]}")
    for row in result["rows"]:
        print(f"  {row['strategy']:13s} renders/case {row['renders_per_case']:5.2f} ({row['renders_vs_full']:.2f}x full)  "
              f"steps/case {row['denoise_steps_per_case']:6.1f}  s/case {row['seconds_per_case']:7.3f} ({row['seconds_vs_full']:.2f}x full)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
