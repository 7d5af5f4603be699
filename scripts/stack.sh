#!/usr/bin/env bash
# `make stack`: docker-compose.yml + docker-compose.local.yml on this machine, CPU only, with the tiny test model
# (tests/data/conformance/A): Redis, the S3 server, the API on http://127.0.0.1:8000, the CPU worker and the light
# webhooks worker. Builds what it needs (scripts/images.sh, layer cache: quick when nothing changed), starts the
# stack and returns once every container is healthy (every healthcheck passed, the bucket made), or fails showing
# the containers' state and logs. `scripts/stack.sh down` (`make stack-down`) removes every container, network and
# volume of the stack.
# Secrets and the API key: made once, random, in .cache/stack/<project>.env (ignored by git); the key is
# SUPIR_STACK_API_KEY there: curl -H "Authorization: Bearer $key" http://127.0.0.1:8000/v1/jobs ...
# docker-compose 1.29 (Debian's) rejects the top-level `name:` of docker-compose.yml and ends a `${VAR:?message}` at
# the first `}` of its message, so it reads a copy without the first and with such messages shortened, and gets
# the project name on its command line (SUPIR_STACK_PROJECT, default supir-serve-local).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "stack: $*" >&2; }
action=${1:-up}
project=${SUPIR_STACK_PROJECT:-supir-serve-local}
state=.cache/stack
envfile=$state/$project.env
wait_s=${SUPIR_STACK_WAIT_S:-1200}
weights=${SUPIR_STACK_WEIGHTS:-$PWD/tests/data/conformance/A}

random() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }
write_env() {
  [ -f "$envfile" ] && return 0
  mkdir -p "$state"
  local key
  key=sk-$(random)
  umask 077
  cat >"$envfile" <<ENV
# made by scripts/stack.sh for the local stack; remove it for new secrets
SUPIR_STACK_API_KEY=$key
SUPIR_API_KEYS=[{"id":"local","sha256":"$(printf %s "$key" | sha256sum | cut -d' ' -f1)"}]
SUPIR_SIGNING_SECRET=$(random)
SUPIR_WEBHOOK_SECRET=$(random)
MINIO_ROOT_PASSWORD=$(random)
GRAFANA_ADMIN_PASSWORD=$(random)
ENV
}

compose() {
  mkdir -p "$state/$project"
  grep -v '^name:' docker-compose.yml | sed -E 's/\$\{([A-Z0-9_]+):\?[^}]*\{.*\}$/${\1:?set \1}/' \
    >"$state/$project/docker-compose.yml"
  SUPIR_WEIGHTS_DIR=$weights SUPIR_SDXL_FILE=sdxl.safetensors SUPIR_SUPIR_FILE=supir.safetensors \
    docker-compose --project-name "$project" --project-directory . --env-file "$envfile" \
    -f "$state/$project/docker-compose.yml" -f docker-compose.local.yml "$@"
}

# one line per container of the project: name, state, health (or "none"), exit code
containers() {
  local ids
  ids=$(docker ps -aq --filter "label=com.docker.compose.project=$project")
  [ -n "$ids" ] || return 0
  # shellcheck disable=SC2086
  docker inspect --format \
    '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.ExitCode}} {{.RestartCount}}' \
    $ids
}

show_failure() {
  log "$1"
  compose ps >&2 || true
  compose logs --no-color --tail 60 >&2 || true
  exit 1
}

up() {
  bash scripts/ensure-docker.sh
  [ -f "$weights/sdxl.safetensors" ] || { log "no tiny model in $weights"; exit 1; }
  bash scripts/images.sh api worker-cpu redis s3
  write_env
  log "starting $project"
  COMPOSE_PROFILES=cpu compose up -d --no-build --remove-orphans >&2
  local deadline=$(($(date +%s) + wait_s)) pending
  while :; do
    pending=""
    while read -r service state health code restarts; do
      [ -n "$service" ] || continue
      [ "$restarts" -le 2 ] || show_failure "$service keeps restarting (exit $code)"
      case "$service:$state:$health" in
        minio-init:exited:*) [ "$code" = 0 ] || show_failure "minio-init failed (exit $code)" ;;
        *:running:healthy | *:running:none) ;;
        *:running:starting) pending+=" $service" ;;
        *:running:unhealthy) show_failure "$service is unhealthy" ;;
        *:restarting:*) pending+=" $service(restarting)" ;;
        *) pending+=" $service($state)" ;;
      esac
    done < <(containers)
    [ -z "$pending" ] && [ -n "$(containers)" ] && break
    [ "$(date +%s)" -lt "$deadline" ] || show_failure "not healthy after ${wait_s} s:$pending"
    sleep 3
  done
  log "healthy: API on http://127.0.0.1:8000 (key: SUPIR_STACK_API_KEY in $envfile), /metrics and /status on" \
    "http://127.0.0.1:8001, S3 on http://localhost:9000"
}

down() {
  command -v docker >/dev/null 2>&1 || { log "no docker: nothing to remove"; return 0; }
  bash scripts/ensure-docker.sh
  write_env
  COMPOSE_PROFILES=cpu,gpu,v0f,monitoring compose down --volumes --remove-orphans --timeout 60 >&2 ||
    log "compose down failed (two starts at once leave networks of one name): removing by label"
  # whatever compose no longer knows (a renamed service, an interrupted start) goes too
  local left
  left=$(docker ps -aq --filter "label=com.docker.compose.project=$project")
  # shellcheck disable=SC2086
  [ -z "$left" ] || docker rm -f -v $left >/dev/null
  left=$(docker network ls -q --filter "label=com.docker.compose.project=$project")
  # shellcheck disable=SC2086
  [ -z "$left" ] || docker network rm $left >/dev/null
  left=$(docker volume ls -q --filter "label=com.docker.compose.project=$project")
  # shellcheck disable=SC2086
  [ -z "$left" ] || docker volume rm -f $left >/dev/null
  log "removed $project's containers, networks and volumes"
}

case $action in
  up) up ;;
  down) down ;;
  *) log "usage: scripts/stack.sh [up|down]"; exit 2 ;;
esac
