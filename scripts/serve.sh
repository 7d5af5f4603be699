#!/usr/bin/env bash
# `make serve`: Redis (started if needed), one GPU worker, the light webhook worker (worker.webhooks) and the API
# on 127.0.0.1:8000, local storage, dev auth.
# Weights come from SUPIR_SDXL_CHECKPOINT / SUPIR_CHECKPOINT; without them, the tiny conformance model of
# ../shared/conformance/A is used so the service can be tried (its pictures are noise). One Ctrl-C stops all.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

bash scripts/ensure-redis.sh
export SUPIR_DEV_MODE=${SUPIR_DEV_MODE:-true}
export SUPIR_STORAGE=${SUPIR_STORAGE:-local}
export SUPIR_LOCAL_DIR=${SUPIR_LOCAL_DIR:-data}
export SUPIR_PUBLIC_URL=${SUPIR_PUBLIC_URL:-http://127.0.0.1:8000}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
if [ -z "${SUPIR_SDXL_CHECKPOINT:-}" ] || [ -z "${SUPIR_CHECKPOINT:-}" ]; then
  demo=../shared/conformance/A
  if [ -f "$demo/sdxl.safetensors" ]; then
    echo "serve: SUPIR_SDXL_CHECKPOINT / SUPIR_CHECKPOINT not set: using the tiny random test model in $demo" >&2
    export SUPIR_SDXL_CHECKPOINT=$demo/sdxl.safetensors SUPIR_CHECKPOINT=$demo/supir.ckpt SUPIR_MODEL_CONFIG=$demo/config.json
  else
    echo "serve: set SUPIR_SDXL_CHECKPOINT and SUPIR_CHECKPOINT to the weight files" >&2
    exit 2
  fi
fi

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
  --beat --schedule "${TMPDIR:-/tmp}/supir-beat-schedule" --loglevel INFO -n "webhooks@%h" &
pids+=($!)
"$VENV/bin/python" -m api.server --host 127.0.0.1 --port "${PORT:-8000}" &
pids+=($!)
echo "serve: API on http://127.0.0.1:${PORT:-8000} (docs at /docs); Ctrl-C stops everything" >&2
wait -n "${pids[@]}"
