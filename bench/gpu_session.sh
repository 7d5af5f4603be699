#!/usr/bin/env bash
# The GPU measurements of issue 8 as one prepared script for a device session (bench/device_wheels.sh first, here).
# One part per device call, each sized to end within 8 minutes on one H100 (estimates below), run with timeout 560:
#
#   device run, carry [".whl"], timeout 560:  bash bench/gpu_session.sh main        # baseline, tuned at 1024²
#   ...                                       bash bench/gpu_session.sh tiled       # tuned, tiled 2048²
#   ...                                       bash bench/gpu_session.sh fp8         # tuned + fp8 weights + text offload
#   ...                                       bash bench/gpu_session.sh fp8compute  # tuned + fp8 compute
#   ...                                       bash bench/gpu_session.sh ablate      # each eager setting alone, regional
#   ...                                       bash bench/gpu_session.sh graphs      # full-graph compile + CUDA graphs
#   ...                                       bash bench/gpu_session.sh samples     # 3 samples in one batched run
#   ...                                       bash bench/gpu_session.sh faces       # the face pass: 4 faces (faces.py)
#
# How the parts were sized (upper figures, H100, none measured yet; the JSON records each one to check them):
#   T     one 1024² restoration at 50 steps: ≤ 7 s (the official pipeline takes 6.3–6.7 s; eager bf16/fp16 is expected
#         near it, compiled configurations below it)
#   start carried wheels, imports, CUDA init ≤ 30 s;  build (random full-size weights on the GPU, no file read) ≤ 15 s
#   warm  3 sampler steps per size (gpu_restore.py --warmup-steps): same shapes, so the same graphs as a 50-step run:
#         ≤ 2 s eager at 1024², plus the first compile: regional ≤ 3 min, full graph ≤ 6 min; ≤ 15 s at 2048² tiled
#   flops one eager guided network call under FlopCounterMode ≤ 3 s per untiled size
#   2048² tiled ≤ 9 T (4–9 × 1024²); its tiles go one per call, each the shape of a 1024² call, so the graphs compiled
#         once serve both
#   part        sum of the upper figures                                               seconds      minutes
#   main        start 30 + baseline (build 15, warm 2, 2 T, flops 3) 34
#                        + tuned (build 15, compile 180 + warm 2, 2 T, flops 3) 214         278          4.6
#   tiled       start 30 + build 15 + compile 180 + warm 15 at 2048² + 9 T 63               303          5.1
#   fp8         start 30 + lean (build 15, compile 180 + warm 2, 1 T, flops 3) 207          237          4.0
#   fp8compute  the same with fp8 compute                                                   237          4.0
#   ablate      start 30 + 4 eager configurations × (15 + 2 + 7 + 3) 108 + regional 207   345          5.8
#   graphs      start 30 + build 15 + full compile 360 + warm 2 + 1 T + flops 3             417          7.0
#   samples     start 30 + build 15 + compile 180 (batch of 3) + warm 2 + 3 T 21 + flops 3  251          4.2
#   faces       start 30 + build 15 + warm-up 15 + 3 rows of a 4096×1024 photo (≤ 7 T: 50 each)
#                        + 4 faces at 768² in two of them (2 × 16)                          242          4.0
#   Typical figures (compile 2 min regional, 4 min full; T 6.5 s) take 1–2 minutes less each.
# Guards: gpu_restore.py and faces.py start no configuration (row) once the time left before the deadline
# (DEADLINE_S, default 480 s from this script's start) is less than the longest one so far took; those are recorded as
# "skipped": "deadline". Results land in $OUT (gpu_restore.json or faces.json, env.txt, log.txt), the JSON rewritten
# whole after every load and run, so a part cut off at its limit still returns every figure it finished.
#
# Smoke test on a CPU (tests/supir_core/test_bench.py runs every part so):
#   SKIP_WHEELS=1 PATH=.venv/bin:$PATH bash bench/gpu_session.sh ablate --tiny --size 128 --steps 2
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
deadline=${DEADLINE_S:-480}
if [ -z "${SKIP_WHEELS:-}" ]; then  # SKIP_WHEELS=1: a machine that has the packages (a smoke test here)
  # the machine's own torch (its CUDA build) must stay the one imported: carried wheels never include it
  if ls .whl/ | grep -qiE '^(torch|triton|nvidia)'; then echo "refusing .whl/: it holds torch/CUDA wheels"; exit 1; fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache  # configurations share kernels of equal blocks
# one python for the versions and the torch check (each start imports torch: seconds): diffusers' and transformers'
# versions from their installed metadata (the same copies an import would find first), not from importing them
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "
import sys, torch
from importlib.metadata import version
print(torch.__version__, torch.version.cuda, torch.__file__, version('diffusers'), version('transformers'))
major, minor = (int(v) for v in torch.__version__.split('+')[0].split('.')[:2])
sys.exit(None if (major, minor) >= (2, 11) else f'torch {torch.__version__}: the bench needs torch 2.11 or later')
"; ok=$?
  date -u; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
[ "$ok" -eq 0 ] || exit 1
part=${1:-main}
shift || true
case "$part" in
  main)       args=(--configs baseline,tuned --runs untiled) ;;
  tiled)      args=(--configs tuned --runs tiled) ;;
  fp8)        args=(--configs lean --runs untiled --repeats 1) ;;
  fp8compute) args=(--configs fp8compute --runs untiled --repeats 1) ;;
  ablate)     args=(--configs bf16,channels_last,fuse_qkv,fp8weights,regional --repeats 1) ;;  # compiled last
  graphs)     args=(--configs full_graphs --repeats 1) ;;
  samples)    args=(--configs tuned --runs untiled --num-samples 3 --repeats 1) ;;  # s_per_image against main's tuned
  faces)
    python3 bench/faces.py --faces 4 --deadline-s $((deadline - SECONDS)) "$@" 2>&1 | tee "$OUT/log.txt"
    exit ;;
  *) echo "usage: $0 main|tiled|fp8|fp8compute|ablate|graphs|samples|faces [gpu_restore.py / faces.py flags]"
     exit 2 ;;
esac
python3 bench/gpu_restore.py "${args[@]}" --deadline-s $((deadline - SECONDS)) "$@" 2>&1 | tee "$OUT/log.txt"
