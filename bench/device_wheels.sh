#!/usr/bin/env bash
# Wheels that the GPU machine's image lacks (it has torch, transformers, accelerate, safetensors, pillow, tqdm),
# fetched here into .whl/ (git-ignored) for `bench/gpu_session.sh`: the device machine cannot reach PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pip=(python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl)
"${pip[@]}" diffusers==0.42.1 importlib_metadata==10.2.0 pydantic==2.14.4 pydantic_core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 ftfy==6.3.1 wcwidth==0.9.4
du -sh .whl
