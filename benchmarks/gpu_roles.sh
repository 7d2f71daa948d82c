#!/usr/bin/env bash
# Every role x backend on CUDA in bfloat16 next to the CPU in float32, on a GPU machine:
# builds the zoo, runs `music roles check` on both devices, then the role test files with the
# roles' default device (auto: CUDA + bfloat16 when a GPU is present). Run from the repo root.
#   bash benchmarks/gpu_roles.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/music-gpu}
mkdir -p "$out"
export MUSIC_HOME=$(mktemp -d) PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
python3 -m flows.cli zoo build 2>&1 | grep -v "Loading weights\|Writing model"
for target in "cuda bfloat16" "cpu float32"; do
  set -- $target
  echo "== roles check on $1 ($2)"
  python3 -m flows.cli roles check --device "$1" --dtype "$2" --json "$out/roles_$1.json" 2>&1 | grep -v "Loading weights\|Writing model\|Loading pipeline"
done
python3 - "$out" <<'PY'
import json, sys
cuda = {r["name"]: r for r in json.load(open(f"{sys.argv[1]}/roles_cuda.json"))}
cpu = {r["name"]: r for r in json.load(open(f"{sys.argv[1]}/roles_cpu.json"))}
print(f"{'role':28s} {'cuda load s':>11} {'cuda batch s':>12} {'cpu batch s':>11} {'cpu/cuda':>8}")
for name, row in cuda.items():
    if row["ok"] and cpu[name]["ok"]:
        print(f"{name:28s} {row['load_s']:11.2f} {row['batch_s']:12.3f} {cpu[name]['batch_s']:11.3f} {cpu[name]['batch_s'] / row['batch_s']:8.2f}")
    else:
        print(f"{name:28s} FAILED cuda: {row['output'][:80]} | cpu: {cpu[name]['output'][:80]}")
PY
echo "== role tests with device auto (CUDA, bfloat16)"
python3 -m pytest -q -p no:cacheprovider tests/test_roles_text.py tests/test_roles_diffusion.py tests/test_roles_vision.py \
  tests/test_roles_embed.py tests/test_cache.py tests/test_role_specs.py 2>&1 | tail -25
