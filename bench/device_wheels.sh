#!/usr/bin/env bash
# What `bench/gpu_session.sh` needs on the GPU machine beyond the checkout, gathered here into .whl/ (git-ignored,
# carried to the device): wheels its image lacks (it has torch 2.11 with CUDA 13, transformers, accelerate,
# safetensors, pillow, tqdm; it cannot reach PyPI). Pure-Python or torch-free wheels only, fetched without their
# dependencies: the machine's own torch (its CUDA build) stays the one imported, whatever this repo's CPU lock pins.
# OpenCV (62 MB) would not fit in what travels (64 MiB with the tree); bench/faces.py does without it.
# The key manifest of the full-size files is in tests/data/conformance and travels with the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl  # nothing left over from an earlier fetch travels
pip=(python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl)
"${pip[@]}" diffusers==0.42.1 importlib_metadata==10.2.0 pydantic==2.14.4 pydantic_core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 ftfy==6.3.1 wcwidth==0.9.4
if ls .whl | grep -qiE '^(torch|triton|nvidia)'; then echo "device_wheels: a torch/CUDA wheel got into .whl/" >&2; exit 1; fi
du -sh .whl
