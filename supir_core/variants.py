"""SUPIR variants served side by side: one SDXL base in memory, one SUPIR file per variant (issue 17).

SUPIR-v0Q and v0F differ only in SUPIR's own networks (adaptor, connectors, robust encoder); the UNet, the VAE
autoencoder and both text encoders come from the one SDXL file. So the first variant loads both files and every
further one reads its SUPIR file only and holds the first's modules for the rest.

torch is imported inside `load_variants`: the API process keys its result cache on `model_identity` and never
imports torch.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .checkpoints import ModelOptions
    from .pipeline import RestorationPipeline
    from .speed import SpeedSettings

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
IDENTITY_DIGITS = 16  # 64 bits: no collision among a deployment's few file pairs


def model_identity(sdxl_sha256: str, supir_sha256: str) -> str:
    """A short, stable id of an (SDXL file, SUPIR file) pair: the first 16 hex digits of the sha256 of both hashes."""
    digests = []
    for slot, value in (("sdxl", sdxl_sha256), ("supir", supir_sha256)):
        digest = value.strip().lower()
        if not SHA256_HEX.fullmatch(digest):
            raise ValueError(f"{slot}_sha256={value!r} is not a sha256 hex digest (64 hex digits)")
        digests.append(f"{slot}:{digest}")
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:IDENTITY_DIGITS]


def numerics_identity(device_type: str, dtype: str, fp8: str) -> str:
    """What, beyond the model files, decides a seeded run's numbers: the device type (CUDA and the CPU draw different
    noise for one seed), the networks' dtype and fp8 (weights or compute). The result cache keys on it; the other
    speed settings change results only within the conformance tolerance, as a GPU's kernels do from run to run."""
    return f"{device_type}/{dtype}/fp8={fp8}"


def load_variants(
    sdxl_path: str | Path,
    supir_paths: Mapping[str, str | Path],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    options: ModelOptions | None = None,
    speed: SpeedSettings | None = None,
) -> dict[str, RestorationPipeline]:
    """A pipeline per named SUPIR file, in the mapping's order, over one copy of the SDXL weights.

    Each restores exactly as `RestorationPipeline.from_checkpoints(sdxl_path, its file, ...)` would (same defaults:
    the device's dtype, the VAE in bf16 when dtype is fp16, the speed settings applied to the whole model).
    """
    import torch

    from .checkpoints import ModelOptions, load_supir, load_supir_variant
    from .pipeline import RestorationPipeline, default_device, default_dtype
    from .speed import optimize

    if not supir_paths:
        raise ValueError("load_variants needs at least one SUPIR checkpoint")
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    options = options or ModelOptions()
    names = list(supir_paths)
    first = load_supir(sdxl_path, supir_paths[names[0]], device=device, dtype=dtype, options=options)
    models = {names[0]: first}
    # every variant is loaded before any speed setting rewrites the shared modules
    for name in names[1:]:
        models[name] = load_supir_variant(first, sdxl_path, supir_paths[name], device=device, dtype=dtype)
    for model in models.values():
        if dtype == torch.float16:
            model.vae.to(torch.bfloat16)  # the SDXL VAE overflows in fp16; a no-op on the shared autoencoder after
        if speed is not None:
            # On the shared modules a second pass finds the work done (fused attention is skipped, channels_last
            # and fp8 layers are left as they are, a regional compile wraps the same forward again), so each
            # variant's own networks are optimised and the shared ones stay as the first pass left them.
            optimize(model, speed)
    pipelines = {name: RestorationPipeline(model, speed=speed) for name, model in models.items()}
    prompts = pipelines[names[0]].prompts
    for pipeline in pipelines.values():
        # embeddings depend on the text encoders alone, which are shared: one cache, and one lock around
        # moving them to the device and back when offload_text is on
        pipeline.prompts = prompts
    return pipelines
