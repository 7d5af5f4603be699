"""The assembled SUPIR model: SDXL UNet + connectors, adaptor, VAE + robust encoder, text conditioner."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .text import TextConditioner, TextSpec
from .unet import Adaptor, SupirUNet, UNetSpec
from .vae import SDXL_SCALE_FACTOR, SupirVAE, VAESpec


@dataclass(frozen=True)
class SupirSpec:
    unet: UNetSpec
    vae: VAESpec
    text: TextSpec
    scale_factor: float = SDXL_SCALE_FACTOR


class SupirModel(nn.Module):
    """All of SUPIR's networks. Build from checkpoint files with `supir_core.checkpoints.load_supir`."""

    def __init__(self, spec: SupirSpec) -> None:
        super().__init__()
        self.spec = spec
        self.unet = SupirUNet(spec.unet)
        self.adaptor = Adaptor(spec.unet)
        self.vae = SupirVAE(spec.vae, spec.scale_factor)
        self.text = TextConditioner(spec.text, spec.unet.size_embed_dim)
        self.whole_graph = False  # forward compiled as one graph (speed.compile_networks, compile="full")
        self.cuda_graphs = False  # … and replayed as a CUDA graph

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        vector: torch.Tensor,
        hint: torch.Tensor,
        control_scale: float | torch.Tensor,
    ) -> torch.Tensor:
        """Adaptor and UNet in one call: what compile="full" turns into a single graph."""
        control = self.adaptor(x, timesteps, context, vector, hint)
        return self.unet(x, timesteps, context, vector, control, control_scale)

    def eps(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        vector: torch.Tensor,
        hint: torch.Tensor,
        control_scale: float = 1.0,
    ) -> torch.Tensor:
        """ε_θ(x_in, t, cond, α): adaptor features of (x_in, hint) injected into the UNet decoder."""
        if not self.whole_graph:
            return self.forward(x, timesteps, context, vector, hint, control_scale)
        # α varies per step (linear_control_scale) and per job: as a Python float each value would be baked into
        # a graph of its own; as a tensor one graph serves all (torch.full launches a fill, no host copy or sync)
        scale = torch.full((), float(control_scale), device=x.device)
        if not self.cuda_graphs:
            return self(x, timesteps, context, vector, hint, scale)
        # a new CUDA-graph step: the previous call's output may be overwritten by this replay, and the caller
        # keeps ε across the step (the sampler's D and the callbacks), so it gets a copy
        torch.compiler.cudagraph_mark_step_begin()
        return self(x, timesteps, context, vector, hint, scale).clone()
