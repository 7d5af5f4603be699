#!/usr/bin/env bash
# Make sure docker, docker-compose and mmdebstrap are installed and a Docker daemon answers: install the Debian
# packages (docker.io, docker-compose, mmdebstrap) with apt when absent, start dockerd when it is not running.
set -euo pipefail
log() { echo "docker: $*" >&2; }
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)  # a docker client alone (no dockerd) is not enough
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} with apt"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

docker info >/dev/null 2>&1 && exit 0
if ! pgrep -x dockerd >/dev/null 2>&1; then
  log "starting dockerd (log: /tmp/dockerd.log)"
  # shellcheck disable=SC2024  # the log file belongs to whoever runs this
  $sudo sh -c 'nohup dockerd >/tmp/dockerd.log 2>&1 &'
fi
for _ in $(seq 120); do
  docker info >/dev/null 2>&1 && { log "daemon up"; exit 0; }
  sleep 1
done
log "the Docker daemon did not answer within 120 s (see /tmp/dockerd.log)"
exit 1
