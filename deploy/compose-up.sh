#!/usr/bin/env bash
# `docker compose up -d` with a GPU worker for each SUPIR variant whose file is in SUPIR_WEIGHTS_DIR: v0Q always,
# v0F when SUPIR-v0F.ckpt is there. SUPIR_VARIANTS, which the API reads to accept a variant, then lists exactly the
# variants served. With two GPUs (or SUPIR_V0F_GPU set), v0F gets its own worker (profile v0f); with one, the one
# worker serves both, sharing the SDXL base in memory. Arguments go to `docker compose up -d`.
set -euo pipefail
cd "$(dirname "$0")/.."
weights=${SUPIR_WEIGHTS_DIR:?set SUPIR_WEIGHTS_DIR to the folder holding the weight files}
variants="\"v0Q\": \"/models/${SUPIR_SUPIR_FILE:-SUPIR-v0Q.ckpt}\""
profiles=${COMPOSE_PROFILES:-}
if [ -f "$weights/SUPIR-v0F.ckpt" ]; then
  variants+=', "v0F": "/models/SUPIR-v0F.ckpt"'
  gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  if [ -n "${SUPIR_V0F_GPU:-}" ] || [ "${gpus:-0}" -ge 2 ]; then
    profiles=${profiles:+$profiles,}v0f
  else
    export SUPIR_WORKER_VARIANTS=v0Q,v0F
  fi
fi
export SUPIR_VARIANTS="{$variants}" COMPOSE_PROFILES=$profiles
echo "compose-up: SUPIR_VARIANTS=$SUPIR_VARIANTS${COMPOSE_PROFILES:+ profiles=$COMPOSE_PROFILES}" >&2
exec docker compose up -d "$@"
