#!/usr/bin/env bash
# Regenerate the image lock files (constraints/*.lock) from pyproject.toml and constraints/*.in, with hashes, against
# the real PyPI only (the host's pip configuration and local indexes are ignored), for Linux x86_64 and Python 3.11,
# the images' platform. The CPU torch wheel is the one local file (SUPIR_TORCH_CPU_WHEEL's folder, found by name).
# Other packages take the versions of the tests' venv (.venv) when it exists. Then checks that the CUDA lock installs as locked, without downloading it (pip --dry-run).
# Run it after changing pyproject.toml's dependencies or an .in file; commit the .lock files it writes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS='' PIP_EXTRA_INDEX_URL='' PIP_INDEX_URL=https://pypi.org/simple
export UV_INDEX_URL=https://pypi.org/simple UV_EXTRA_INDEX_URL='' UV_FIND_LINKS='' UV_NO_CONFIG=1
wheel=${SUPIR_TORCH_CPU_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
tools=.cache/lock-tools
if [ ! -x "$tools/bin/uv" ]; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install --quiet "uv==0.13.9"
fi
# the versions the tests run (make install's venv) where it exists, so the images run what was tested
tested=.cache/locks/tested-versions.txt
mkdir -p "$(dirname "$tested")"
: >"$tested"
if [ -x "${VENV:-.venv}/bin/python" ]; then
  "${VENV:-.venv}/bin/python" -m pip freeze --exclude-editable 2>/dev/null | grep -v -E '^(torch|pip|setuptools)==' >"$tested" || true
fi
compile() {  # out extra in [uv options...]
  local out=$1 extra=$2 input=$3
  shift 3
  "$tools/bin/uv" pip compile --quiet --generate-hashes --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --no-emit-find-links --emit-index-url \
    --custom-compile-command "scripts/locks.sh" --extra "$extra" -c "$tested" "$@" -o "$out" pyproject.toml "$input"
  echo "locks: wrote $out ($(grep -c '^[a-z0-9]' "$out") packages)" >&2
}
compile constraints/api.lock api constraints/api.in
compile constraints/worker-cpu.lock worker constraints/worker-cpu.in --find-links "$(dirname "$wheel")"
compile constraints/worker-cuda.lock worker constraints/worker-cuda.in
"$tools/bin/uv" pip compile --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --emit-index-url --custom-compile-command "scripts/locks.sh" -c "$tested" -o constraints/s3.lock constraints/s3.in
# the CUDA lock resolves and its hashes are complete, without downloading the multi-GB wheels
"$tools/bin/uv" pip install --dry-run --require-hashes --no-deps --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --target "$(mktemp -d)" -r constraints/worker-cuda.lock >&2
