"""The eps-prediction denoiser over the discrete SDXL schedule, with σ snapped to the training grid (spec §3.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .schedules import legacy_ddpm_sigmas


@dataclass
class Conditioning:
    """One side of classifier-free guidance: text tokens, ADM vector and the LQ control latent."""

    crossattn: torch.Tensor  # [B, 77, context_dim]
    vector: torch.Tensor  # [B, adm_in_channels]
    control: torch.Tensor  # [B, 4, h, w], scaled latent space


class EpsNetwork(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        vector: torch.Tensor,
        hint: torch.Tensor,
        control_scale: float = 1.0,
    ) -> torch.Tensor: ...


@dataclass
class DenoiserOutput:
    denoised: torch.Tensor
    eps: torch.Tensor
    timestep: torch.Tensor
    sigma_quantized: torch.Tensor


class Denoiser:
    """D(x, σ) = x − σ_q · ε_θ(c_in·x, t*), t* = argmin_t |σ − σ_t|, σ_q = σ_{t*}, c_in = 1/√(σ_q² + 1)."""

    def __init__(self, network: EpsNetwork, train_sigmas: torch.Tensor | None = None) -> None:
        self.network = network
        self.train_sigmas = legacy_ddpm_sigmas() if train_sigmas is None else train_sigmas
        self._grids: dict[torch.device, torch.Tensor] = {}  # a copy per device: no host→device copy per step

    @property
    def sigma_max(self) -> float:
        return float(self.train_sigmas[-1])

    def quantize(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t*, σ_q) per sample: the nearest training timestep and its sigma."""
        grid = self._grids.get(sigma.device)
        if grid is None:
            grid = self._grids[sigma.device] = self.train_sigmas.to(sigma.device)
        t = (sigma.float()[:, None] - grid[None, :]).abs().argmin(dim=1)
        return t, grid[t]

    def run(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, control_scale: float = 1.0
    ) -> DenoiserOutput:
        """D(x, σ) with its intermediates; sigma is one value per batch element."""
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        t, sigma_q = self.quantize(sigma)
        c_in = (1.0 / (sigma_q**2 + 1.0).sqrt())[:, None, None, None]
        eps = self.network(x * c_in, t, cond.crossattn, cond.vector, cond.control, control_scale).to(x.dtype)
        return DenoiserOutput(x - sigma_q[:, None, None, None] * eps, eps, t, sigma_q)

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, control_scale: float = 1.0
    ) -> torch.Tensor:
        return self.run(x, sigma, cond, control_scale).denoised
