#!/usr/bin/env bash
# `make serve`: Redis (started where SUPIR_REDIS_URL points, if it is this machine), one GPU (here CPU) worker, the
# light webhook worker (worker.webhooks) and the API on 127.0.0.1:$PORT (default 8000), local storage, dev auth.
# Everything the service writes goes under data/ (SERVE_DATA_DIR): uploads and results in data/objects, the beat
# schedule in data/celery. Weights come from SUPIR_SDXL_CHECKPOINT + SUPIR_CHECKPOINT (or SUPIR_VARIANTS); without them, the
# tiny random test model in tests/data/conformance/A is served, so the service can be tried (its pictures are
# noise): both variants (v0Q and, derived from it once, v0F) and small default parameters (SUPIR_DEFAULT_PARAMS),
# so each request finishes in seconds on a CPU. One Ctrl-C stops all.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PORT=${PORT:-8000}
DATA=${SERVE_DATA_DIR:-data}  # the service's own folder (data/ is in .gitignore)
TINY=tests/data/conformance/A

fail() {
  echo "serve: $*" >&2
  exit 2
}

# --- weights: the user's, or the tiny test model ---------------------------------------------------------------
sdxl=${SUPIR_SDXL_CHECKPOINT:-}
supir=${SUPIR_CHECKPOINT:-}
variants=${SUPIR_VARIANTS:-}
tiny=false
if [ -z "$sdxl" ] && [ -z "$supir" ] && [ -z "$variants" ]; then
  tiny=true
elif [ -z "$sdxl" ]; then
  fail "SUPIR_CHECKPOINT${variants:+ (or SUPIR_VARIANTS)} is set but SUPIR_SDXL_CHECKPOINT is not: set both" \
    "SUPIR_SDXL_CHECKPOINT (the SDXL file) and SUPIR_CHECKPOINT (the SUPIR file), or neither to try the tiny" \
    "test model"
elif [ -z "$supir" ] && [ -z "$variants" ]; then
  fail "SUPIR_SDXL_CHECKPOINT is set but SUPIR_CHECKPOINT is not: set both SUPIR_SDXL_CHECKPOINT (the SDXL file)" \
    "and SUPIR_CHECKPOINT (the SUPIR file, or SUPIR_VARIANTS for several), or neither to try the tiny test model"
fi
if ! $tiny; then
  for f in "$sdxl" "$supir"; do
    [ -z "$f" ] || [ -f "$f" ] || fail "no such weight file: $f"
  done
  if [ -z "${SUPIR_DEVICE:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "serve: no NVIDIA GPU found: the worker runs the full model on the CPU, where one job at the official" \
      "defaults (1024 px, 50 steps) takes hours and about 20 GB of memory; pass small min_size and steps, or set" \
      "SUPIR_DEFAULT_PARAMS='{\"min_size\": 256, \"steps\": 8}'" >&2
  fi
fi

if $tiny; then
  [ -f "$TINY/sdxl.safetensors" ] || fail "the tiny test model is missing from $TINY (a partial clone?)"
  cat >&2 <<EOF
serve: ================================================================================================
serve: SUPIR_SDXL_CHECKPOINT and SUPIR_CHECKPOINT are not set: serving the TINY TEST MODEL
serve: ($TINY, random weights). Every restored picture will be NOISE; this only shows the service working.
serve: Defaults suited to it (SUPIR_DEFAULT_PARAMS) keep each job to seconds on a CPU; the page and /status
serve: say "test model", and both variants (v0Q, v0F) are served.
serve:
serve: For real restorations you need an NVIDIA GPU with about 12 GB of memory (8 GB with SUPIR_FP8=weights and
serve: SUPIR_OFFLOAD_TEXT=true) and the official weights, 12.3 GB (see \`$VENV/bin/supir weights list\`):
serve:   $VENV/bin/supir weights download sdxl-base --dir ~/models                            # 6.9 GB
serve:   $VENV/bin/supir weights download supir-v0q --dir ~/models --revision <hub commit>    # 5.3 GB
serve: (SUPIR's licence is non-commercial; its hub revision is yours to pin: pick the commit you checked,
serve: docs/operations.md#weights), then:
serve:   SUPIR_SDXL_CHECKPOINT=~/models/sd_xl_base_1.0_0.9vae.safetensors \\
serve:   SUPIR_CHECKPOINT=~/models/SUPIR-v0Q.ckpt make serve
serve: ================================================================================================
EOF
  # a second SUPIR file, so `variant=v0F` works as documented: the tiny one's tensors moved by seeded noise
  # (tests/variant_files.py), made once (about a second) and remade when the tiny model changes
  v0f=$DATA/tiny-model/supir-v0F.safetensors
  if [ ! -f "$v0f" ] || [ "$v0f" -ot "$TINY/supir.safetensors" ]; then
    mkdir -p "$(dirname "$v0f")"
    "$VENV/bin/python" -c 'import sys; from tests.variant_files import make_variant_checkpoint as m
m(sys.argv[1], sys.argv[2] + ".part.safetensors", seed=1)' "$TINY/supir.safetensors" "$v0f"
    mv "$v0f.part.safetensors" "$v0f"
  fi
  export SUPIR_SDXL_CHECKPOINT=$TINY/sdxl.safetensors SUPIR_MODEL_CONFIG=$TINY/config.json
  export SUPIR_VARIANTS="{\"v0Q\": \"$TINY/supir.safetensors\", \"v0F\": \"$v0f\"}"
  export SUPIR_DEFAULT_VARIANT=v0Q
  # the tiny model at the official 1024-px / 50-step defaults takes 25+ minutes on a 2-core CPU; with these a
  # job takes seconds. Only what a request leaves unset: the job's params show every value used.
  export SUPIR_DEFAULT_PARAMS=${SUPIR_DEFAULT_PARAMS:-'{"min_size": 256, "steps": 8}'}
fi

# --- Redis: where SUPIR_REDIS_URL points (REDIS_PORT on this machine when it is unset) ---------------------------
export SUPIR_REDIS_URL=${SUPIR_REDIS_URL:-redis://127.0.0.1:${REDIS_PORT:-6379}/0}
bash scripts/ensure-redis.sh

export SUPIR_DEV_MODE=${SUPIR_DEV_MODE:-true}
export SUPIR_STORAGE=${SUPIR_STORAGE:-local}
export SUPIR_LOCAL_DIR=${SUPIR_LOCAL_DIR:-$DATA/objects}
# result links are signed for the address the API listens on
export SUPIR_PUBLIC_URL=${SUPIR_PUBLIC_URL:-http://127.0.0.1:$PORT}
# /metrics and /status are served on this second port only (never the clients' one): PORT + 1 unless set
export SUPIR_API_ADMIN_PORT=${SUPIR_API_ADMIN_PORT:-$((PORT + 1))}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$DATA/celery"

pids=()
stop() {
  trap - INT TERM EXIT
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

# no --queues: the worker consumes <SUPIR_QUEUE>-<variant> for each variant it serves (its settings name them)
"$VENV/bin/celery" -A worker.tasks worker --pool prefork --concurrency 1 --loglevel INFO -n "gpu@%h" &
pids+=($!)
# the light worker: webhooks (never behind restorations) and, with --beat, the hourly retention sweep; no weights
"$VENV/bin/celery" -A worker.webhooks worker --pool threads --concurrency 8 --queues "${SUPIR_QUEUE:-supir}-webhooks" \
  --beat --schedule "$DATA/celery/beat-schedule" --loglevel INFO -n "webhooks@%h" &
pids+=($!)
"$VENV/bin/python" -m api.server --host 127.0.0.1 --port "$PORT" &
pids+=($!)
if $tiny; then
  echo "serve: reminder: the TINY TEST MODEL is served, so every result is noise (real weights: see above)" >&2
fi
echo "serve: the page and the API on http://127.0.0.1:$PORT/ (docs at /docs), /metrics and /status on" \
  "http://127.0.0.1:$SUPIR_API_ADMIN_PORT/; Ctrl-C stops everything" >&2
wait -n "${pids[@]}"
