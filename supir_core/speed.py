"""Speed and memory settings for the networks, each off by default and each checked against the conformance outputs.

channels_last   NHWC convolutions (faster convs on tensor cores)
fuse_qkv        one matmul for q, k, v (self-attention) and for k, v (cross-attention); the unfused
                projections are dropped, so fusing costs no memory
compile         "regional": torch.compile each repeated block (transformer blocks, ResNet blocks) of the
                UNet and the adaptor — compile time stays low because equal blocks share one graph;
                "full": the adaptor and the UNet together as one graph (fullgraph=True: no graph breaks), the
                form CUDA graphs need; "none": eager. The control scale α changes every step with
                linear_control_scale, so it enters the full graph as a tensor: one graph serves every α
compile_dynamic False: graphs specialised to each shape (fastest kernels; each new image size, sample count or
                number of tiles per call compiles anew, once, and the compile cache keeps it); True: sizes
                symbolic from the start, one compile serves every size (the worker's default: a service's sizes
                vary). `compile_counts` says how many graphs were compiled and how many calls fell back to eager
cuda_graphs     compile="full" in "reduce-overhead" mode: the graph is replayed as a CUDA graph, which removes
                the per-kernel launch cost. CUDA, inductor and compile="full" only (refused otherwise: with
                regional compile each block would be its own CUDA graph whose output the next one overwrites)
fp8             float8 (e4m3) Linear layers in the UNet, connectors and adaptor, one scale per weight row.
                "weights": weight-only storage, half the memory of bf16 weights; matmuls stay in the model dtype.
                "compute": the transformer blocks' weights and, per token, their activations in float8, multiplied
                by torch._scaled_mm (Hopper/Ada fp8 tensor cores: about twice bf16's rate). On CUDA it needs
                compile: eager, rounding the activations costs more kernels and traffic than the matmul saves
                (refused at start). Neither is exact: their tolerance is looser than the conformance one (see
                tests/supir_core/test_speed.py).
                Written here rather than taken from torchao: a few lines that run (and are tested) on the CPU
                too, with no import-time side effects and no coupling of versions to the installed torch
offload_text    the CLIP text encoders wait in CPU memory and visit the device only to encode a prompt that
                is not in the prompt cache (the pipeline's), freeing 1.6 GB of device memory at full size
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from torch.nn import functional as F

from .errors import SettingsError
from .models.supir import SupirModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedSettings:
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: Literal["none", "regional", "full"] = "none"
    compile_backend: str = "inductor"
    cuda_graphs: bool = False
    compile_cache_dir: Path | None = None  # survives worker restarts when on a persistent volume
    compile_dynamic: bool = False
    fp8: Literal["none", "weights", "compute"] = "none"
    offload_text: bool = False
    prompt_cache: int = 64  # prompt embeddings kept (the negative prompt and default prompts repeat every job)
    memory_budget_gb: float | None = None  # activations a run may use (tiling=auto); None: measured on the device
    plan_cache_dir: Path | None = None  # traced memory plans kept across processes (supir_core.memory)

    @classmethod
    def from_attributes(cls, source: Any) -> SpeedSettings:
        """The settings that `source` (CLI arguments, worker settings) holds under these fields' names."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls) if hasattr(source, f.name)})

    def check(self, device: torch.device) -> None:
        """Refuse combinations that cannot work on `device` now, at start, rather than mid-job (or silently)."""
        if self.cuda_graphs:
            if self.compile != "full":
                raise SettingsError(
                    f"cuda_graphs needs compile=full, not {self.compile!r}: each regionally compiled block would be "
                    "its own CUDA graph, and the next block's replay overwrites the output it reads"
                )
            if self.compile_backend != "inductor":
                raise SettingsError(f"cuda_graphs needs the inductor compile backend, not {self.compile_backend!r}")
            if device.type != "cuda":
                raise SettingsError(f"cuda_graphs needs a CUDA device, not {device.type}")
        if self.fp8 == "compute" and device.type == "cuda":
            if self.compile == "none":
                raise SettingsError(
                    "fp8=compute needs compile (regional or full) on CUDA: eager, rounding each activation to "
                    "float8 takes more kernels and memory traffic than the float8 matmul saves"
                )
            if torch.cuda.get_device_capability(device) < (8, 9):
                name = torch.cuda.get_device_name(device)
                raise SettingsError(
                    f"fp8=compute needs fp8 tensor cores (Ada or Hopper, compute capability 8.9+), not {name}"
                )


def optimize(model: SupirModel, settings: SpeedSettings) -> SupirModel:
    """Apply the settings in place to the diffusion networks (UNet + connectors, adaptor) and the VAE."""
    settings.check(next(model.unet.parameters()).device)
    networks: tuple[nn.Module, nn.Module] = (model.unet, model.adaptor)
    if settings.channels_last:
        for net in (*networks, model.vae):
            net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # valid, not in the stubs
    if settings.fuse_qkv:
        for net in networks:
            fuse_projections(net)
    if settings.fp8 != "none":
        for net in networks:
            quantize_fp8(net, settings.fp8)
    if settings.offload_text:
        model.text.to("cpu")
    if settings.compile != "none":
        compile_networks(model, settings)
    return model


def fuse_projections(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, Attention) and not getattr(module, "fused_projections", False):
            module.fuse_projections(fuse=True)
            module.set_processor(FusedAttnProcessor2_0())
            # the fused processor reads to_qkv (self-attention) or to_q + to_kv (cross-attention) only
            for name in ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v"):
                delattr(module, name)


E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _to_fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row scaled so its largest magnitude lands on e4m3's largest value: (float8 rows, fp32 scale [rows, 1])."""
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


class Fp8Linear(nn.Module):
    """A Linear layer with float8 weights (one scale per output row).

    compute=False: the weights are widened to the activations' dtype at each call (memory saving only; under
    torch.compile the widening fuses into the matmul's prologue). compute=True: the activations are rounded to
    float8 per token too and both go through torch._scaled_mm, the fp8 tensor-core matmul.
    """

    def __init__(self, linear: nn.Linear, compute: bool) -> None:
        super().__init__()
        weight, scale = _to_fp8_rows(linear.weight.detach())
        self.compute = compute
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in]
        self.weight_scale = nn.Parameter(scale, requires_grad=False)  # [out, 1]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.compute:  # scaled in fp32, rounded once: a bf16 scale would be off by up to 0.4% per row
            return F.linear(x, (self.weight.float() * self.weight_scale).to(x.dtype), self.bias)
        rows = x.reshape(-1, x.shape[-1])
        x8, x_scale = _to_fp8_rows(rows)
        # weight.t() is column-major, the layout _scaled_mm wants for its second operand
        out_dtype = torch.bfloat16 if x.is_cuda else x.dtype  # CUDA's row-wise scaled matmul writes bf16 only
        y = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.t(), out_dtype=out_dtype)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def swap_fp8_linear(root: nn.Module, compute: bool) -> None:
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Fp8Linear(child, compute))


def quantize_fp8(net: nn.Module, mode: str) -> None:
    """weights: every Linear layer (nearly all of the UNet's and adaptor's weights). compute: the Linear layers of the
    transformer blocks (attention projections, feed-forward: nearly all Linear FLOPs); the timestep and size
    embeddings, the projections in and out of the blocks and the connectors stay in the model dtype, which keeps
    the error of rounding activations within the weight-only one."""
    if mode == "weights":
        swap_fp8_linear(net, compute=False)
        return
    for block in [m for m in net.modules() if isinstance(m, BasicTransformerBlock)]:
        swap_fp8_linear(block, compute=True)


def compile_networks(model: SupirModel, settings: SpeedSettings) -> None:
    _use_cache_dir(settings.compile_cache_dir)
    # every block class shares one forward, so its graphs (one per block shape, and per size unless dynamic) share
    # one cache; past the limit a call runs eager (counted by compile_counts)
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 1024)
    if settings.compile_dynamic:
        # duck shaping gives dims of equal size one symbol: at a size where a token count equals a channel count
        # (64 tokens of 64 channels), layer norm's width pins both, and each later size compiles again
        import torch.fx.experimental._config as fx_config

        fx_config.use_duck_shape = False
    options: dict[str, Any] = {"backend": settings.compile_backend, "dynamic": settings.compile_dynamic}
    if settings.compile == "full":
        if settings.cuda_graphs:
            options["mode"] = "reduce-overhead"
        model.compile(fullgraph=True, **options)  # forward: adaptor + UNet, one graph
        model.whole_graph, model.cuda_graphs = True, settings.cuda_graphs
        return
    for net in (model.unet, model.adaptor):
        for module in net.modules():
            if isinstance(module, BasicTransformerBlock | ResnetBlock2D):
                module.compile(**options)


def _use_cache_dir(path: Path | None) -> None:
    """The setting wins over an inherited TORCHINDUCTOR_CACHE_DIR (inductor reads the variable when it compiles)."""
    if path is None:
        return
    path.mkdir(parents=True, exist_ok=True)
    inherited = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if inherited and Path(inherited) != path:
        log.info(
            "compile cache: %s (the compile_cache_dir setting) instead of TORCHINDUCTOR_CACHE_DIR=%s", path, inherited
        )
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)


def compile_counts() -> dict[str, int]:
    """What torch.compile did in this process so far, from Dynamo's own counters: graphs compiled (the first of each
    function and every recompile), and functions that hit the recompile limit (each runs eager from then on)."""
    from torch._dynamo.utils import counters

    limit_hits = sum(
        n
        for reason, n in counters["unimplemented"].items()
        if "recompile limit" in reason or "cache_size_limit" in reason
    )
    return {"graphs": int(counters["stats"]["unique_graphs"]), "eager_fallbacks": int(limit_hits)}


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
