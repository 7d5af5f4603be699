"""Speed and memory settings for the networks, each off by default and each checked against the conformance outputs.

channels_last   NHWC convolutions (faster convs on tensor cores)
fuse_qkv        one matmul for q, k, v (self-attention) and for k, v (cross-attention); the unfused
                projections are dropped, so fusing costs no memory
compile         "regional": torch.compile each repeated block (transformer blocks, ResNet blocks) of the
                UNet and the adaptor — compile time stays low because equal blocks share one graph;
                "full": the adaptor and the UNet each as one graph (fullgraph=True: no graph breaks), the
                form CUDA graphs need; "none": eager
cuda_graphs     compile in "reduce-overhead" mode: each compiled graph is replayed as a CUDA graph, which
                removes the per-kernel launch cost (CUDA only; inductor skips it on other devices)
fp8_weights     float8 (e4m3) weight-only storage for every Linear layer of the UNet, connectors and adaptor
                (torchao): half the memory of bf16 weights; activations stay in the model dtype. Not exact:
                its tolerance is looser than the conformance one (see tests/test_speed.py)
offload_text    the CLIP text encoders wait in CPU memory and visit the device only to encode a prompt that
                is not in the prompt cache (the pipeline's), freeing 1.6 GB of device memory at full size
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
from torch import nn

from .errors import WeightsError
from .models.supir import SupirModel


@dataclass(frozen=True)
class SpeedSettings:
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: Literal["none", "regional", "full"] = "none"
    compile_backend: str = "inductor"
    cuda_graphs: bool = False
    compile_cache_dir: Path | None = None  # survives worker restarts when on a persistent volume
    fp8_weights: bool = False
    offload_text: bool = False
    prompt_cache: int = 64  # prompt embeddings kept (the negative prompt and default prompts repeat every job)


def optimize(model: SupirModel, settings: SpeedSettings) -> SupirModel:
    """Apply the settings in place to the diffusion networks (UNet + connectors, adaptor) and the VAE."""
    networks: tuple[nn.Module, nn.Module] = (model.unet, model.adaptor)
    if settings.channels_last:
        for net in (*networks, model.vae):
            net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # valid, not in the stubs
    if settings.fuse_qkv:
        for net in networks:
            fuse_projections(net)
    if settings.fp8_weights:
        for net in networks:
            quantize_fp8(net)
    if settings.offload_text:
        model.text.to("cpu")
    if settings.compile != "none":
        compile_networks(networks, settings)
    return model


def fuse_projections(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, Attention) and not getattr(module, "fused_projections", False):
            module.fuse_projections(fuse=True)
            module.set_processor(FusedAttnProcessor2_0())
            # the fused processor reads to_qkv (self-attention) or to_q + to_kv (cross-attention) only
            for name in ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v"):
                delattr(module, name)


def quantize_fp8(net: nn.Module) -> None:
    try:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise WeightsError("fp8 weights need torchao: pip install 'supir-serve[fp8]'") from exc
    quantize_(net, Float8WeightOnlyConfig())  # every nn.Linear: per-row scales, weights in float8_e4m3fn


def compile_networks(networks: tuple[nn.Module, ...], settings: SpeedSettings) -> None:
    if settings.compile_cache_dir is not None:
        settings.compile_cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.compile_cache_dir))
    # every block class shares one forward, so its graphs (one per width and resolution) share one cache
    dynamo = torch._dynamo.config
    dynamo.cache_size_limit = max(dynamo.cache_size_limit, 64)
    dynamo.accumulated_cache_size_limit = max(dynamo.accumulated_cache_size_limit, 1024)
    options = {"backend": settings.compile_backend, "dynamic": False}
    if settings.cuda_graphs and settings.compile_backend == "inductor":
        options["mode"] = "reduce-overhead"
    for net in networks:
        if settings.compile == "full":
            net.compile(fullgraph=True, **options)
            continue
        for module in net.modules():
            if isinstance(module, BasicTransformerBlock | ResnetBlock2D):
                module.compile(**options)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (fp8 data + scales) rather than at their dtype."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) is not nn.Parameter and type(tensor) is not torch.Tensor:
        names, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(module: nn.Module) -> int:
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))
