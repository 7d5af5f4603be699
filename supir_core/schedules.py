"""Noise schedules: SDXL's legacy DDPM training sigmas and the sampling grid built on them (spec §3.1)."""

from __future__ import annotations

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
LINEAR_START = 0.00085
LINEAR_END = 0.012


def legacy_ddpm_sigmas(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    linear_start: float = LINEAR_START,
    linear_end: float = LINEAR_END,
) -> torch.Tensor:
    """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) for t = 0…T−1 of the scaled-linear β schedule, ascending, float32.

    β_t = linspace(√β_start, √β_end, T)², ᾱ_t = ∏(1 − β); the ratio is formed in float64 and the
    square root taken in float32, as the reference implementation does.
    """
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    ratio = ((1.0 - alphas_cumprod) / alphas_cumprod).to(torch.float32)
    return ratio.sqrt()


def sampling_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Descending training indices int(linspace(T−1, 0, N, endpoint=False)): 999, 979, … for N = 50."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    steps = np.linspace(num_train_timesteps - 1, 0, num_steps, endpoint=False).astype(int)
    return steps


def sampling_sigmas(num_steps: int, train_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """The N + 1 descending sigmas an N-step sampler visits: training sigmas at `sampling_timesteps`, then 0."""
    if train_sigmas is None:
        train_sigmas = legacy_ddpm_sigmas()
    steps = torch.from_numpy(sampling_timesteps(num_steps, len(train_sigmas)).copy())
    return torch.cat([train_sigmas[steps], train_sigmas.new_zeros(1)])


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, then 0.

    In float32 throughout, as k-diffusion computes it for SUPIR (so the ends round as the official grid's do).
    """
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float32)
    inv_max = torch.tensor(sigma_max, dtype=torch.float32) ** (1 / rho)
    inv_min = torch.tensor(sigma_min, dtype=torch.float32) ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def dpmpp_sigmas(num_steps: int, train_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """SUPIR's DPM++ grid: Karras sigmas between the ends of the legacy N-step grid (spec §3.9)."""
    legacy = sampling_sigmas(num_steps, train_sigmas)
    return karras_sigmas(num_steps, float(legacy[-2]), float(legacy[0]))
