#!/usr/bin/env bash
# Pillow's own test images (Tests/images in its sdist) for tests/faults/test_pillow_corpus.py: the sdist of the
# Pillow version in the venv, downloaded once with pip; the tests read the tarball and never touch the network.
set -euo pipefail
VENV=${VENV:-.venv}
CACHE=${SUPIR_CORPUS_DIR:-.cache/pillow-sdist}
version=$("$VENV/bin/python" -c 'import PIL; print(PIL.__version__)')
shopt -s nullglob
found=("$CACHE"/[Pp]illow-"$version".tar.gz)
[ ${#found[@]} -gt 0 ] && exit 0
mkdir -p "$CACHE"
echo "corpus: downloading the Pillow $version sdist into $CACHE"
"$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    "pillow==$version" -d "$CACHE"
