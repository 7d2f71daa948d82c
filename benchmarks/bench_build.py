"""The tiny training-set build at 64 and 256 source images (shard size 16): wall time against the
in-stage model compute, task runs, model loads and peak memory, side by side.

    python benchmarks/bench_build.py [--sizes 64 256] [--out /tmp/music-bench]

Each build runs as its own `music build` process against the local Prefect server (started once
here), so peak RSS is that build's alone. The 64-image run is the baseline of the ratios."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.ops.server import ensure_server  # noqa: E402  (no prefect import: safe before the build)


def run_build(size: int, out: Path) -> dict:
    spec = yaml.safe_load((ROOT / "data_specs" / "tiny.yaml").read_text())
    spec.update(name=f"bench-{size}", num_source_images=size, shard_size=16, output_root=str(out))
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / f"bench-{size}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    result_path = out / f"bench-{size}.json"
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "build", str(spec_path), "--json", str(result_path)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"build of {size} failed (status {status}); rerun `music build {spec_path}` to see why")
    result = json.loads(result_path.read_text())
    model = sum(t["model_seconds"] for t in result["stages"])
    return {"size": size, "wall_s": wall, "flow_s": result["wall_seconds"], "model_s": model,
            "task_runs": result["task_runs"], "model_loads": result["model_loads"], "samples": result["samples"],
            "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--out", type=Path, default=Path("/tmp/music-bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_server()
    rows = [run_build(size, args.out / str(size)) for size in args.sizes]
    base = rows[0]
    print(f"{'sources':>8} {'wall s':>8} {'flow s':>8} {'model s':>8} {'wall/model':>10} {'task runs':>9} "
          f"{'loads':>6} {'samples':>8} {'peak MB':>8} {'wall x':>7} {'mem x':>6}")
    for r in rows:
        print(f"{r['size']:>8} {r['wall_s']:>8.1f} {r['flow_s']:>8.1f} {r['model_s']:>8.1f} {r['wall_s'] / r['model_s']:>10.2f} "
              f"{r['task_runs']:>9} {r['model_loads']:>6} {r['samples']:>8} {r['peak_rss_mb']:>8.0f} "
              f"{r['wall_s'] / base['wall_s']:>7.2f} {r['peak_rss_mb'] / base['peak_rss_mb']:>6.2f}")
    print("wall s: the whole `music build` process (imports, zoo load, Prefect); flow s: the flow itself; "
          "model s: time inside model calls summed over shards; x columns: ratio to the first size.")


if __name__ == "__main__":
    main()
