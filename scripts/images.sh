#!/usr/bin/env bash
# Build the service's images with the classic builder (no buildx needed): `make images` builds `api` and
# `worker-cpu`; `scripts/images.sh api worker-cpu redis s3` adds the local stack's Redis and S3 (moto) images;
# `worker-cuda` builds the GPU worker. All FROM one base (scripts/base-image.sh: the public python image pinned in
# the Dockerfiles, else a Debian image made with mmdebstrap). The host's extra CA certificates
# (/usr/local/share/ca-certificates/*.crt, when present) and the CPU torch wheel go into the ignored folder
# .docker-build, which the Dockerfiles read in their dependency stage only.
# Tags: supir-serve-<name>:$SUPIR_VERSION (default: pyproject's version), the CPU worker supir-serve-worker:<v>-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "images: $*" >&2; }
[ $# -gt 0 ] || set -- api worker-cpu

bash scripts/ensure-docker.sh
base=$(bash scripts/base-image.sh)
version=${SUPIR_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)}
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
source_url=${SUPIR_SOURCE_URL:-$(git config --get remote.origin.url 2>/dev/null || echo unknown)}
ctx=.docker-build

sync_file() {  # copy only when the content differs, keeping the time: an unchanged file keeps the layer cache
  mkdir -p "$(dirname "$2")"
  cmp -s "$1" "$2" 2>/dev/null || cp -p "$1" "$2"
}
mkdir -p "$ctx/certs" "$ctx/wheels"
want=()
for crt in "${SUPIR_EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"/*.crt; do
  [ -f "$crt" ] || continue
  sync_file "$crt" "$ctx/certs/$(basename "$crt")"
  want+=("$(basename "$crt")")
done
for have in "$ctx"/certs/*.crt; do  # certificates no longer on the host leave the context too
  [ -f "$have" ] || continue
  [[ " ${want[*]-} " == *" $(basename "$have") "* ]] || rm -f "$have"
done

build() {  # tag dockerfile [build args...]
  local tag=$1 file=$2 started
  shift 2
  started=$(date +%s)
  log "building $tag ($file, base $base)"
  DOCKER_BUILDKIT=0 docker build --quiet=false -f "$file" -t "$tag" \
    --build-arg BASE_IMAGE="$base" --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    --build-arg SOURCE="$source_url" "$@" . >&2
  log "built $tag in $(($(date +%s) - started)) s"
}

for name in "$@"; do
  case $name in
    api) build "supir-serve-api:$version" docker/api.Dockerfile ;;
    worker-cpu)
      wheel=${SUPIR_TORCH_CPU_WHEEL:-}
      if [ -z "$wheel" ]; then
        for wheel in /opt/wheels/torch-2.13.0+cpu-cp311-*.whl; do break; done
      fi
      if [ ! -f "$wheel" ]; then
        log "the CPU torch wheel is missing: set SUPIR_TORCH_CPU_WHEEL to torch-2.13.0+cpu-cp311-*-manylinux_2_28_x86_64.whl"
        exit 1
      fi
      for have in "$ctx"/wheels/*.whl; do [ "$(basename "$have")" = "$(basename "$wheel")" ] || rm -f "$have"; done
      [ -f "$ctx/wheels/$(basename "$wheel")" ] || ln -f "$wheel" "$ctx/wheels/" 2>/dev/null || cp -p "$wheel" "$ctx/wheels/"
      build "supir-serve-worker:$version-cpu" docker/worker.Dockerfile --build-arg TORCH_FLAVOUR=cpu ;;
    worker-cuda)
      rm -f "$ctx"/wheels/*.whl  # the CUDA lock takes everything from PyPI
      build "supir-serve-worker:$version" docker/worker.Dockerfile --build-arg TORCH_FLAVOUR=cuda ;;
    redis) build "supir-serve-redis:local" docker/redis.Dockerfile ;;
    s3) build "supir-serve-s3:local" docker/s3.Dockerfile ;;
    *) log "unknown image $name (api, worker-cpu, worker-cuda, redis, s3)"; exit 2 ;;
  esac
done
