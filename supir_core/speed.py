"""Speed settings for the networks, each off by default and each checked against the conformance outputs.

channels_last   NHWC convolutions (faster convs on tensor cores)
fuse_qkv        one matmul for q, k, v (self-attention) and for k, v (cross-attention)
compile         "regional": torch.compile each repeated block (transformer blocks, ResNet blocks) of the
                UNet and the adaptor — compile time stays low because equal blocks share one graph —;
                "none": eager
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D

from .models.supir import SupirModel


@dataclass(frozen=True)
class SpeedSettings:
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: Literal["none", "regional"] = "none"
    compile_backend: str = "inductor"
    compile_cache_dir: Path | None = None  # survives worker restarts when on a persistent volume


def optimize(model: SupirModel, settings: SpeedSettings) -> SupirModel:
    """Apply the settings in place to the diffusion networks (UNet + connectors, adaptor) and the VAE."""
    networks = (model.unet, model.adaptor)
    if settings.channels_last:
        for net in (*networks, model.vae):
            net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # valid, not in the stubs
    if settings.fuse_qkv:
        for net in networks:
            for module in net.modules():
                if isinstance(module, Attention) and not getattr(module, "fused_projections", False):
                    module.fuse_projections(fuse=True)
                    module.set_processor(FusedAttnProcessor2_0())
    if settings.compile == "regional":
        if settings.compile_cache_dir is not None:
            settings.compile_cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.compile_cache_dir))
        # every block class shares one forward, so its graphs (one per width and resolution) share one cache
        dynamo = torch._dynamo.config
        dynamo.cache_size_limit = max(dynamo.cache_size_limit, 64)
        dynamo.accumulated_cache_size_limit = max(dynamo.accumulated_cache_size_limit, 1024)
        for net in networks:
            for module in net.modules():
                if isinstance(module, BasicTransformerBlock | ResnetBlock2D):
                    module.compile(backend=settings.compile_backend, dynamic=False)
    return model
