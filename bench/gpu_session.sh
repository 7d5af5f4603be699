#!/usr/bin/env bash
# The GPU measurements of issue 8 as one prepared script for a device session (bench/device_wheels.sh first, here).
#
#   device run, carry [".whl"], timeout 560:  bash bench/gpu_session.sh main     # baseline, tuned (1024², 2048²)
#   device run, carry [".whl"], timeout 560:  bash bench/gpu_session.sh fp8      # fp8 weights + offload, fp8 compute
#   device run, carry [".whl"], timeout 560:  bash bench/gpu_session.sh ablate   # each setting alone
#   device run, carry [".whl"], timeout 560:  bash bench/gpu_session.sh samples  # 3 samples in one batched run
#   device run, carry [".whl"], timeout 560:  bash bench/gpu_session.sh faces    # the face pass: 4 faces (faces.py)
# Each part is sized for one call of under 10 minutes (compiling takes most of it); run them in this order.
#
# Smoke test on a CPU: SKIP_WHEELS=1 PATH=.venv/bin:$PATH bash bench/gpu_session.sh ablate --tiny --size 128 --steps 2
# Results land in $OUT (gpu_restore.json, env.txt, log.txt), written after each configuration, so a run cut off
# at its limit still returns what it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
if [ -z "${SKIP_WHEELS:-}" ]; then  # SKIP_WHEELS=1: a machine that has the packages (a smoke test here)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache  # configurations share kernels of equal blocks
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, diffusers, transformers; print(torch.__version__, torch.version.cuda, diffusers.__version__, transformers.__version__)"
  date -u; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
case "${1:-main}" in
  main)   args=(--configs baseline,tuned) ;;
  fp8)    args=(--configs lean,fp8compute) ;;
  ablate) args=(--configs bf16,channels_last,fuse_qkv,regional,full_graphs,fp8weights --repeats 1) ;;
  samples) args=(--configs tuned --num-samples 3 --tiled-size 1024) ;;  # s_per_image against main's tuned 1024²
  faces) shift; python3 bench/faces.py --faces 4 "$@" 2>&1 | tee "$OUT/log.txt"; exit ;;
  *) echo "usage: $0 main|fp8|ablate|samples|faces [gpu_restore.py / faces.py flags]"; exit 2 ;;
esac
shift || true
python3 bench/gpu_restore.py "${args[@]}" "$@" 2>&1 | tee "$OUT/log.txt"
