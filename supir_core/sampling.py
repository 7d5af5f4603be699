"""Sampler loops over a denoiser callable, and their per-step helpers (spec §3.3–3.6, §3.8; FORMAT.md §4.1–4.7).

A sampler knows nothing of networks or parameters. It is handed `denoise(x, sigma_hat, control_scale) -> D`, the
guided (CFG-combined) denoiser, the sigmas, the noise it must use (so every run can be replayed exactly) and the
knobs of its update rule as keyword arguments named as the public parameters (RestoreParams). Turning parameters
into a run — the settings, the sigmas, which sampler, the CFG wrappers that bind the network — is
`supir_core.guidance`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import Canceled
from .tiling import Window, gaussian_weights, tile_windows

GuidedDenoise = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
TiledDenoise = Callable[[torch.Tensor, torch.Tensor, float, list[Window]], torch.Tensor]
NoiseFn = Callable[[int, torch.Tensor], torch.Tensor]  # (step, like) -> N(0, I) of like's shape
Callback = Callable[[dict[str, Any]], None]
RESTORATION_MIN_SIGMA = 0.05  # restoration guidance applies while σ_{i+1} is above this (official restore_cfg_s_tmin)


def noise_from(source: torch.Tensor | Sequence[torch.Tensor] | torch.Generator | None) -> NoiseFn:
    """Recorded noise (indexed by step), a generator, or the global RNG, as a NoiseFn."""
    if isinstance(source, torch.Generator):
        gen = source
        return lambda i, like: torch.randn(like.shape, generator=gen, device=gen.device).to(like)
    if source is None:
        return lambda i, like: torch.randn_like(like)
    recorded = source
    return lambda i, like: recorded[i].to(like)


def churn_gamma(s_churn: float, steps: int) -> float:
    """γ = min(s_churn / N, √2 − 1): how far each EDM step raises σ before denoising (the same every step)."""
    return min(s_churn / steps, math.sqrt(2.0) - 1.0)


def control_scale_at(
    sigma: float, sigma_max: float, *, control_scale: float, control_scale_start: float, linear_control_scale: bool
) -> float:
    """α at σ: control_scale, or with linear_control_scale a ramp from control_scale_start at σ_max to control_scale
    at σ = 0 (spec §3.4)."""
    if not linear_control_scale:
        return control_scale
    k = sigma / sigma_max
    return control_scale_start * k + control_scale * (1.0 - k)


def restoration_guided(
    denoised: torch.Tensor,
    x_center: torch.Tensor | None,
    sigma: float,
    sigma_next: float,
    sigma_max: float,
    *,
    restoration_scale: float,
    restoration_min_sigma: float = RESTORATION_MIN_SIGMA,
) -> torch.Tensor:
    """Restoration guidance: D ← D − (D − z_c)·(σ_i/σ_max)^τ, τ = restoration_scale, while σ_{i+1} is above
    restoration_min_sigma; τ ≤ 0 (or no z_c) turns it off (spec §3.5)."""
    if x_center is None or restoration_scale <= 0 or sigma_next <= restoration_min_sigma:
        return denoised
    return denoised - (denoised - x_center) * (sigma / sigma_max) ** restoration_scale


def edm_step(
    denoise: GuidedDenoise,
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    gamma: float,
    alpha: float,
    s_noise: float,
    restoration_scale: float,
    restoration_min_sigma: float = RESTORATION_MIN_SIGMA,
    sigma_max: float,
    xi: torch.Tensor | None,
    x_center: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One Euler step with churn and restoration guidance: x ← x + (σ_{i+1} − σ̂)(x − D)/σ̂ (spec §3.6).

    σ̂ = σ_i(1 + γ); with γ > 0 the step's noise ξ is added first, scaled by s_noise·√(σ̂² − σ_i²). α is this step's
    control scale (`control_scale_at`)."""
    sigma_hat = sigma * (1.0 + gamma)
    if gamma > 0 and xi is not None:
        x = x + s_noise * xi * math.sqrt(sigma_hat**2 - sigma**2)
    sigma_hat_b = x.new_full((x.shape[0],), sigma_hat)
    denoised_cfg = denoise(x, sigma_hat_b, alpha)
    denoised = restoration_guided(  # on the pre-churn σ
        denoised_cfg,
        x_center,
        sigma,
        sigma_next,
        sigma_max,
        restoration_scale=restoration_scale,
        restoration_min_sigma=restoration_min_sigma,
    )
    x_next = x + (sigma_next - sigma_hat) * (x - denoised) / sigma_hat
    info = {
        "sigma": sigma,
        "sigma_hat": sigma_hat,
        "control_scale": alpha,
        "denoised_cfg": denoised_cfg,
        "denoised": denoised,
    }
    return x_next, info


def _stop_if_asked(should_stop: Callable[[], bool] | None, i: int, steps: int) -> None:
    if should_stop is not None and should_stop():
        raise Canceled(f"canceled before step {i + 1} of {steps}")


@dataclass(frozen=True)
class _ControlRamp:
    """A run's α schedule: `control_scale_at` with the run's settings bound."""

    sigma_max: float
    control_scale: float
    control_scale_start: float
    linear_control_scale: bool

    def at(self, sigma: float) -> float:
        return control_scale_at(
            sigma,
            self.sigma_max,
            control_scale=self.control_scale,
            control_scale_start=self.control_scale_start,
            linear_control_scale=self.linear_control_scale,
        )


@dataclass(frozen=True)
class _EdmRule:
    """The knobs of `edm_step` that hold for a whole run; a step adds its σs, α, ξ and z_c."""

    gamma: float
    s_noise: float
    restoration_scale: float
    restoration_min_sigma: float
    sigma_max: float

    def step(
        self,
        denoise: GuidedDenoise,
        x: torch.Tensor,
        sigma: float,
        sigma_next: float,
        alpha: float,
        xi: torch.Tensor | None,
        x_center: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return edm_step(
            denoise,
            x,
            sigma,
            sigma_next,
            gamma=self.gamma,
            alpha=alpha,
            s_noise=self.s_noise,
            restoration_scale=self.restoration_scale,
            restoration_min_sigma=self.restoration_min_sigma,
            sigma_max=self.sigma_max,
            xi=xi,
            x_center=x_center,
        )


def restore_edm(
    denoise: GuidedDenoise,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    sigma_max: float,
    s_churn: float = 0.0,
    s_noise: float = 1.0,
    restoration_scale: float = -1.0,
    restoration_min_sigma: float = RESTORATION_MIN_SIGMA,
    control_scale: float = 1.0,
    control_scale_start: float = 0.0,
    linear_control_scale: bool = False,
    x_center: torch.Tensor | None = None,
    step_noise: NoiseFn | None = None,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Restoration-guided Euler sampler with churn, from unscaled noise ε: x_0 = ε·√(1 + σ_0²) (spec §3.6).

    The defaults turn every extra off (no churn, no restoration guidance, α = 1); the product's defaults are
    RestoreParams'. step_noise(i, x) is step i's churn noise, asked for only when s_churn > 0."""
    step_noise = step_noise or noise_from(None)
    steps = len(sigmas) - 1
    gamma = churn_gamma(s_churn, steps)
    ramp = _ControlRamp(sigma_max, control_scale, control_scale_start, linear_control_scale)
    rule = _EdmRule(gamma, s_noise, restoration_scale, restoration_min_sigma, sigma_max)
    x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    for i in range(steps):
        _stop_if_asked(should_stop, i, steps)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        xi = step_noise(i, x) if gamma > 0 else None
        x, info = rule.step(denoise, x, sigma, sigma_next, ramp.at(sigma), xi, x_center)
        if callback is not None:
            callback({"x": x, "i": i, "steps": steps, **info})
    return x


def restore_edm_tiled(
    denoise: TiledDenoise,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    tile: int,
    stride: int,
    sigma_max: float,
    s_churn: float = 0.0,
    s_noise: float = 1.0,
    restoration_scale: float = -1.0,
    restoration_min_sigma: float = RESTORATION_MIN_SIGMA,
    control_scale: float = 1.0,
    control_scale_start: float = 0.0,
    linear_control_scale: bool = False,
    x_center: torch.Tensor | None = None,
    step_noise: NoiseFn | None = None,
    tiles_per_batch: int = 1,  # 0: all tiles of a step in one call (split by the denoiser if memory runs out)
    centered_tile_weights: bool = False,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """`restore_edm` on overlapping tiles, each step blended with Gaussian weights (spec §3.8).

    denoise(x_tiles, sigma_hat, α, windows) gets the crops of `windows` stacked along the batch
    (len(windows) · B rows) and crops whatever per-tile conditioning it holds itself. step_noise(i, x) is drawn
    full-size every step (as the official code draws it) and sliced per tile; it is used only when s_churn > 0.
    """
    step_noise = step_noise or noise_from(None)
    steps = len(sigmas) - 1
    gamma = churn_gamma(s_churn, steps)
    ramp = _ControlRamp(sigma_max, control_scale, control_scale_start, linear_control_scale)
    rule = _EdmRule(gamma, s_noise, restoration_scale, restoration_min_sigma, sigma_max)
    windows = tile_windows(noise.shape[-2], noise.shape[-1], tile, stride)
    per_call = tiles_per_batch or len(windows)
    groups = [windows[first : first + per_call] for first in range(0, len(windows), per_call)]
    weights = gaussian_weights(tile, centered_tile_weights).to(noise.device)
    x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    for i in range(steps):
        _stop_if_asked(should_stop, i, steps)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        alpha = ramp.at(sigma)
        xi = step_noise(i, x)  # one full-size field per step, sliced per tile
        x, sigma_hat = _blended_edm_step(
            denoise, x, sigma, sigma_next, alpha, xi if gamma > 0 else None, x_center, rule, groups, weights
        )
        if callback is not None:
            callback({"x": x, "i": i, "steps": steps, "sigma": sigma, "sigma_hat": sigma_hat, "control_scale": alpha})
    return x


def _blended_edm_step(
    denoise: TiledDenoise,
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    alpha: float,
    xi: torch.Tensor | None,
    x_center: torch.Tensor | None,
    rule: _EdmRule,
    groups: list[list[Window]],
    weights: torch.Tensor,
) -> tuple[torch.Tensor, float]:
    """One EDM step on every tile, a group of tiles per denoiser call, blended with the Gaussian `weights`:
    (x at σ_next, σ̂)."""
    acc, count = torch.zeros_like(x), torch.zeros_like(x)
    info: dict[str, Any] = {}
    for group in groups:

        def crops(t: torch.Tensor, group: list[Window] = group) -> torch.Tensor:
            return torch.cat([t[..., h0:h1, w0:w1] for h0, h1, w0, w1 in group])

        def denoise_group(xc: torch.Tensor, sh: torch.Tensor, a: float, group: list[Window] = group) -> torch.Tensor:
            return denoise(xc, sh, a, group)

        xi_tiles = crops(xi) if xi is not None else None
        center_tiles = crops(x_center) if x_center is not None else None
        out, info = rule.step(denoise_group, crops(x), sigma, sigma_next, alpha, xi_tiles, center_tiles)
        for (h0, h1, w0, w1), y in zip(group, out.chunk(len(group)), strict=True):
            acc[..., h0:h1, w0:w1] += y * weights  # float64 product, accumulated in x's dtype
            count[..., h0:h1, w0:w1] += weights
    return acc / count, info["sigma_hat"]


def restore_dpmpp_2m(
    denoise: GuidedDenoise,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    sigma_max: float,
    init_sigma: float | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    control_scale: float = 1.0,
    full_guidance: bool = False,
    restoration_scale: float = -1.0,
    restoration_min_sigma: float = RESTORATION_MIN_SIGMA,
    control_scale_start: float = 0.0,
    linear_control_scale: bool = False,
    x_center: torch.Tensor | None = None,
    step_noise: NoiseFn | None = None,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022) as SUPIR's RestoreDPMPP2MSampler steps it (FORMAT.md §4.7).

    x_0 = ε·√(1 + init_sigma²) (SUPIR scales by the legacy grid's σ_0, not the Karras one). Each step:
    x ← (σ'/σ)e^{−ηh}·x + a·D with a = 1 − e^{−(1+η)h}, h = ln σ − ln σ'; from step 1 on the 2M correction
    a·(D − D_prev)/(2r), r = h_prev/h, and the noise ξ·σ'·√(1 − e^{−2ηh})·s_noise (ξ = step_noise(i − 1): none on
    step 0); the last step (σ' = 0) returns D. α = control_scale at every step and no restoration guidance, as the
    official sampler ignores the ramp and the x0 blend, unless full_guidance is set: then restoration_scale,
    control_scale_start and linear_control_scale apply on σ_i as in the EDM sampler. There is no churn.
    """
    step_noise = step_noise or noise_from(None)
    steps = len(sigmas) - 1
    ramp = _ControlRamp(sigma_max, control_scale, control_scale_start, linear_control_scale)
    guidance = {"restoration_scale": restoration_scale, "restoration_min_sigma": restoration_min_sigma}
    x = noise * math.sqrt(1.0 + (float(sigmas[0]) if init_sigma is None else init_sigma) ** 2)
    old_denoised: torch.Tensor | None = None
    h_last = 0.0
    for i in range(steps):
        _stop_if_asked(should_stop, i, steps)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        alpha = ramp.at(sigma) if full_guidance else control_scale
        denoised_cfg = denoise(x, x.new_full((x.shape[0],), sigma), alpha)
        denoised = denoised_cfg
        if full_guidance:
            denoised = restoration_guided(denoised_cfg, x_center, sigma, sigma_next, sigma_max, **guidance)
        if sigma_next == 0:
            x = denoised
        else:
            x, h_last = _dpmpp_2m_sde_step(
                x, denoised, old_denoised, sigma, sigma_next, h_last, eta, s_noise, step_noise, i
            )
        old_denoised = denoised
        if callback is not None:
            info = {"sigma": sigma, "sigma_hat": sigma, "control_scale": alpha, "denoised_cfg": denoised_cfg}
            callback({"x": x, "i": i, "steps": steps, **info, "denoised": denoised})
    return x


def _dpmpp_2m_sde_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    old_denoised: torch.Tensor | None,
    sigma: float,
    sigma_next: float,
    h_last: float,
    eta: float,
    s_noise: float,
    step_noise: NoiseFn,
    i: int,
) -> tuple[torch.Tensor, float]:
    """Step i of DPM-Solver++(2M) SDE to σ' > 0 (the formulas of `restore_dpmpp_2m`): (x at σ', h)."""
    h = math.log(sigma) - math.log(sigma_next)  # step in half-log-SNR, t = −log σ
    a = -math.expm1(-(1.0 + eta) * h)
    x = (sigma_next / sigma) * math.exp(-eta * h) * x + a * denoised
    if old_denoised is not None:
        x = x + a * (h / (2.0 * h_last)) * (denoised - old_denoised)
        if eta > 0:  # ξ·σ'·√(1 − e^{−2ηh})·s_noise; no draw on step 0 (the official sampler draws none)
            scale = sigma_next * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise
            x = x + step_noise(i - 1, x) * scale
    return x, h
