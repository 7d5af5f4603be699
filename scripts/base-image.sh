#!/usr/bin/env bash
# Print the name of the base image both Dockerfiles build FROM (docker/*.Dockerfile, build argument BASE_IMAGE).
# In order: $BASE_IMAGE when set (pulled if absent); else the public python image pinned in the Dockerfiles when it
# is here; else the Debian base made earlier on this machine (below), so the layers cached on it stay valid; else
# the public image if it can be pulled; else a Debian bookworm image made here with mmdebstrap from Debian packages
# alone (python3, python3-venv, ca-certificates), for machines that reach no container registry. That image is made
# once and kept: making it again would give it a new id and throw away every cached layer built on it.
# SUPIR_BASE=public or SUPIR_BASE=debian forces one of the two.
# Logs go to stderr; stdout is the image name and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "base-image: $*" >&2; }

public=$(sed -n 's/^ARG BASE_IMAGE=//p' docker/api.Dockerfile | head -n1)
local_base=${SUPIR_LOCAL_BASE:-supir-serve-base:bookworm}
suite=${SUPIR_DEBIAN_SUITE:-bookworm}
mirror=${SUPIR_DEBIAN_MIRROR:-http://deb.debian.org/debian}

have() { docker image inspect "$1" >/dev/null 2>&1; }
bash scripts/ensure-docker.sh >&2

if [ -n "${BASE_IMAGE:-}" ]; then
  have "$BASE_IMAGE" || docker pull "$BASE_IMAGE" >&2
  echo "$BASE_IMAGE"
  exit 0
fi
if [ "${SUPIR_BASE:-auto}" != "debian" ]; then
  if have "$public"; then echo "$public"; exit 0; fi
  if [ "${SUPIR_BASE:-auto}" = "auto" ] && have "$local_base"; then echo "$local_base"; exit 0; fi
  if [ "${SUPIR_BASE:-auto}" = "public" ] || timeout 120 docker pull "$public" >/dev/null 2>&1; then
    have "$public" || docker pull "$public" >&2
    echo "$public"
    exit 0
  fi
  log "cannot pull $public: using a Debian $suite base made with mmdebstrap ($local_base)"
fi
if have "$local_base"; then echo "$local_base"; exit 0; fi

log "making $local_base from Debian packages ($mirror, $suite)"
# minbase: dpkg, apt and essentials; python3 3.11 at /usr/bin, venv (with its bundled pip) and the CA bundle.
# The apt lists and caches are left out; images built FROM it run apt-get update themselves.
# shellcheck disable=SC2016  # the hook's $1 (the root being made) is mmdebstrap's to expand
mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  --components=main --aptopt='Acquire::Retries "3"' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
  "$suite" - "$mirror" "deb $mirror $suite-updates main" "deb ${SUPIR_DEBIAN_SECURITY:-http://deb.debian.org/debian-security} $suite-security main" \
  | docker import \
      --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["/bin/bash"]' \
      --message "Debian $suite minbase + python3 (scripts/base-image.sh)" \
      - "$local_base" >&2
echo "$local_base"
