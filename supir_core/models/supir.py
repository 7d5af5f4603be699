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
        control = self.adaptor(x, timesteps, context, vector, hint)
        return self.unet(x, timesteps, context, vector, control, control_scale)
