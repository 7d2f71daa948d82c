"""The data plane side by side with another checkout of the code: the tiny build at several source
counts, the bytes its build folder holds besides the published set (stage shards and stored
images) over the published Parquet bytes, and the peak RSS of publishing alone.

    git worktree add /tmp/music-before <commit before the change>
    python benchmarks/bench_data_plane.py --baseline /tmp/music-before [--sizes 64 256 512]
        [--image-size 128 --reference-size 64] [--out /tmp/music-bench-data]

Each build is a `music build` process of that checkout (its modules first on the path) against one
local Prefect server. Publishing is then timed on its own: a fresh process runs that checkout's
`tasks.publishing.publish.publish` on the build's filter output under a new fingerprint, so its peak RSS is
publish's (the models of the build are not in it). Image sizes default to the tiny spec's; the
spec's real sizes (`--image-size 1024 --reference-size 512`) make the tiny zoo render at them."""
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

from flows.ops.server import ensure_server  # noqa: E402  (no prefect import: safe before the builds)
from music_model.paths import folder_bytes  # noqa: E402

PUBLISH_ALONE = """
import json, resource, sys
from pathlib import Path
from tasks.stages import load_build_spec
from tasks.engine.build_paths import build_dir
from tasks.engine.contract import num_shards
from tasks.publishing.publish import publish
spec = load_build_spec(sys.argv[1])
(filter_dir,) = [p for p in (build_dir(spec) / "stages" / "filter").iterdir() if p.is_dir()]
stats = publish(spec, filter_dir, num_shards(spec), [], "bench-publish-alone")
print(json.dumps({"samples": stats["samples"], "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run(code: Path, size: int, args: argparse.Namespace, out: Path) -> dict:
    spec = yaml.safe_load((ROOT / "data_specs" / "tiny.yaml").read_text())
    spec.update(name=f"bench-{size}", num_source_images=size, shard_size=16, output_root=str(out))
    spec["synthesize"] = {**spec.get("synthesize", {}), "width": args.image_size, "height": args.image_size}
    spec["rerender"] = {**spec.get("rerender", {}), "size": args.reference_size}
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / f"bench-{size}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "build", str(spec_path), "--json", str(out / "build.json")],
                          cwd=code, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{code}: build of {size} failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - start
    build = out / f"bench-{size}"
    published = folder_bytes(build / "dataset" / "data")
    intermediate = folder_bytes(build) - folder_bytes(build / "dataset")
    alone = subprocess.run([sys.executable, "-c", PUBLISH_ALONE, str(spec_path)], cwd=code, env=env, capture_output=True, text=True)
    if alone.returncode != 0:
        raise SystemExit(f"{code}: publish of {size} failed:\n{alone.stderr[-3000:]}")
    publish = json.loads(alone.stdout.strip().splitlines()[-1])
    return {"code": code.name, "size": size, "wall_s": wall, "samples": publish["samples"], "intermediate": intermediate,
            "published": published, "publish_rss_mb": publish["peak_rss_kib"] / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="A checkout of the code to compare with (git worktree).")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--image-size", type=int, default=128, help="Target width and height (the tiny spec's: 128).")
    parser.add_argument("--reference-size", type=int, default=64, help="A reference's longer side (the tiny spec's: 64).")
    parser.add_argument("--out", type=Path, default=Path("/tmp/music-bench-data"))
    args = parser.parse_args()
    ensure_server()
    rows = []
    # Both checkouts at each size before the next size: a long run's partial output is side by side.
    for size in args.sizes:
        for label, code in (("baseline", args.baseline.resolve()), ("this", ROOT)):
            rows.append(run(code, size, args, args.out / f"{label}-{size}"))
            print(json.dumps(rows[-1]), flush=True)
    print(f"targets {args.image_size} px, references {args.reference_size} px")
    print(f"{'code':>10} {'sources':>8} {'samples':>8} {'build MB':>9} {'published MB':>12} {'build/pub':>9} "
          f"{'publish RSS MB':>14} {'RSS x':>6} {'wall s':>7}")
    for code in dict.fromkeys(r["code"] for r in rows):
        mine = [r for r in rows if r["code"] == code]
        for r in mine:
            print(f"{code:>10} {r['size']:>8} {r['samples']:>8} {r['intermediate'] / 1e6:>9.2f} {r['published'] / 1e6:>12.2f} "
                  f"{r['intermediate'] / r['published']:>9.2f} {r['publish_rss_mb']:>14.0f} "
                  f"{r['publish_rss_mb'] / mine[0]['publish_rss_mb']:>6.2f} {r['wall_s']:>7.1f}")
    print("build MB: the build folder besides dataset/ (stage shards, dropped tables, markers, stored images); "
          "published MB: dataset/data/*.parquet; RSS x: publish's peak RSS over the first size's, per checkout.")


if __name__ == "__main__":
    main()
