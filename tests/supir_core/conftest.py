"""Fixtures of the supir_core tests that more than one file uses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def env(fixture_a: Path) -> dict[str, str]:
    """The environment of a `supir` command run on the tiny model of fixture set A, on the CPU in float32."""
    return {
        **os.environ,
        "SUPIR_SDXL_CHECKPOINT": str(fixture_a / "sdxl.safetensors"),
        "SUPIR_CHECKPOINT": str(fixture_a / "supir.ckpt"),
        "SUPIR_MODEL_CONFIG": str(fixture_a / "config.json"),
        "SUPIR_DEVICE": "cpu",
        "SUPIR_DTYPE": "float32",
    }
