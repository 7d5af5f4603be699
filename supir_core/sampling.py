"""Restoration-guided samplers: plain loops over a denoiser callable (spec §3.3–3.6, §3.8).

A sampler knows nothing of networks. It is handed `denoise(x, sigma_hat, control_scale) -> D`, the
guided (CFG-combined) denoiser, and the noise it must use, so every run can be replayed exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .denoiser import Conditioning, Denoiser
from .errors import Canceled
from .tiling import Window, gaussian_weights, tile_windows

GuidedDenoise = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
TiledDenoise = Callable[[torch.Tensor, torch.Tensor, float, list[Window]], torch.Tensor]
NoiseFn = Callable[[int, torch.Tensor], torch.Tensor]  # (step, like) -> N(0, I) of like's shape
Callback = Callable[[dict[str, Any]], None]
RESTORE_CFG_S_TMIN = 0.05


def noise_from(source: torch.Tensor | Sequence[torch.Tensor] | torch.Generator | None) -> NoiseFn:
    """Recorded noise (indexed by step), a generator, or the global RNG, as a NoiseFn."""
    if isinstance(source, torch.Generator):
        gen = source
        return lambda i, like: torch.randn(like.shape, generator=gen, device=gen.device).to(like)
    if source is None:
        return lambda i, like: torch.randn_like(like)
    recorded = source
    return lambda i, like: recorded[i].to(like)


def linear_cfg(
    denoiser: Denoiser, cond: Conditioning, uncond: Conditioning, scale_start: float, scale_end: float
) -> GuidedDenoise:
    """D = D_u + w(σ̂)(D_c − D_u), w going linearly from scale_start at σ_max to scale_end at σ = 0 (spec §3.3).

    Cond and uncond run as one batch [uncond; cond], as the official code does.
    """
    sigma_max = denoiser.sigma_max
    both = Conditioning(
        torch.cat([uncond.crossattn, cond.crossattn]),
        torch.cat([uncond.vector, cond.vector]),
        torch.cat([uncond.control, cond.control]),
    )

    def denoise(x: torch.Tensor, sigma_hat: torch.Tensor, control_scale: float) -> torch.Tensor:
        d_u, d_c = denoiser(torch.cat([x, x]), torch.cat([sigma_hat, sigma_hat]), both, control_scale).chunk(2)
        w = (scale_start - scale_end) * sigma_hat / sigma_max + scale_end
        return d_u + w[:, None, None, None] * (d_c - d_u)

    return denoise


def _stack(conds: list[Conditioning]) -> Conditioning:
    return Conditioning(
        torch.cat([c.crossattn for c in conds]),
        torch.cat([c.vector for c in conds]),
        torch.cat([c.control for c in conds]),
    )


def _crop(c: Conditioning, window: Window) -> Conditioning:
    h0, h1, w0, w1 = window
    return Conditioning(c.crossattn, c.vector, c.control[..., h0:h1, w0:w1])


def tiled_cfg(
    denoiser: Denoiser,
    cond: Conditioning | Mapping[Window, Conditioning],
    uncond: Conditioning,
    scale_start: float,
    scale_end: float,
) -> TiledDenoise:
    """`linear_cfg` for `restore_edm_tiled`: crops the full-size control latent to each window.

    cond may map each window to its own Conditioning (per-tile prompts); controls are full-size.
    A group of windows that does not fit in GPU memory is split in halves until it does, and later groups
    are cut to the size that fitted before they are tried: one out-of-memory error per run, not per step.
    """
    fits = 0  # the most windows per call known to fit; 0: none failed yet

    def guided(x: torch.Tensor, sigma_hat: torch.Tensor, control_scale: float, windows: list[Window]) -> torch.Tensor:
        conds = [_crop(cond[w] if isinstance(cond, Mapping) else cond, w) for w in windows]
        unconds = [_crop(uncond, w) for w in windows]
        return linear_cfg(denoiser, _stack(conds), _stack(unconds), scale_start, scale_end)(x, sigma_hat, control_scale)

    def denoise(x: torch.Tensor, sigma_hat: torch.Tensor, control_scale: float, windows: list[Window]) -> torch.Tensor:
        nonlocal fits
        if not fits or len(windows) <= fits:
            try:
                return guided(x, sigma_hat, control_scale, windows)
            except torch.OutOfMemoryError:
                if len(windows) == 1:
                    raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            fits = (len(windows) + 1) // 2
        rows, size = x.shape[0] // len(windows), fits
        parts = []
        for first in range(0, len(windows), size):
            part = windows[first : first + size]
            rs = slice(first * rows, (first + len(part)) * rows)
            parts.append(denoise(x[rs], sigma_hat[rs], control_scale, part))
        return torch.cat(parts)

    return denoise


@dataclass(frozen=True)
class RestoreSettings:
    """The knobs of one restoration-guided EDM run (defaults: the official test.py)."""

    s_churn: float = 5.0
    s_noise: float = 1.01
    restore_cfg: float = -1.0  # τ_r; <= 0 turns restoration guidance off
    restore_cfg_s_tmin: float = RESTORE_CFG_S_TMIN
    control_scale: float = 1.0  # α at σ → 0
    control_scale_start: float = 0.0  # α at σ_max when linear
    use_linear_control_scale: bool = False

    def gamma(self, num_steps: int) -> float:
        return min(self.s_churn / num_steps, math.sqrt(2.0) - 1.0)

    def guide(
        self, denoised: torch.Tensor, x_center: torch.Tensor | None, sigma: float, sigma_next: float, sigma_max: float
    ) -> torch.Tensor:
        """Restoration guidance: D ← D − (D − z_c)·(σ_i/σ_max)^τ while σ_{i+1} > s_tmin (spec §3.5)."""
        if x_center is None or self.restore_cfg <= 0 or sigma_next <= self.restore_cfg_s_tmin:
            return denoised
        return denoised - (denoised - x_center) * (sigma / sigma_max) ** self.restore_cfg

    def alpha(self, sigma: float, sigma_max: float) -> float:
        if not self.use_linear_control_scale:
            return self.control_scale
        k = sigma / sigma_max
        return self.control_scale_start * k + self.control_scale * (1.0 - k)


def edm_step(
    denoise: GuidedDenoise,
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    gamma: float,
    alpha: float,
    settings: RestoreSettings,
    sigma_max: float,
    churn: torch.Tensor | None,
    x_center: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One Euler step with churn and restoration guidance: x ← x + (σ_{i+1} − σ̂)(x − D)/σ̂ (spec §3.6)."""
    sigma_hat = sigma * (1.0 + gamma)
    if gamma > 0 and churn is not None:
        x = x + settings.s_noise * churn * math.sqrt(sigma_hat**2 - sigma**2)
    sigma_hat_b = x.new_full((x.shape[0],), sigma_hat)
    denoised_cfg = denoise(x, sigma_hat_b, alpha)
    denoised = settings.guide(denoised_cfg, x_center, sigma, sigma_next, sigma_max)  # on the pre-churn σ
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


def restore_edm(
    denoise: GuidedDenoise,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    settings: RestoreSettings = RestoreSettings(),
    sigma_max: float,
    x_center: torch.Tensor | None = None,
    churn_noise: NoiseFn | None = None,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Restoration-guided Euler sampler with churn, from unscaled noise ε: x_0 = ε·√(1 + σ_0²) (spec §3.6)."""
    churn_noise = churn_noise or noise_from(None)
    steps = len(sigmas) - 1
    gamma = settings.gamma(steps)
    x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    for i in range(steps):
        _stop_if_asked(should_stop, i, steps)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        churn = churn_noise(i, x) if gamma > 0 else None
        x, info = edm_step(
            denoise,
            x,
            sigma,
            sigma_next,
            gamma=gamma,
            alpha=settings.alpha(sigma, sigma_max),
            settings=settings,
            sigma_max=sigma_max,
            churn=churn,
            x_center=x_center,
        )
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
    settings: RestoreSettings = RestoreSettings(),
    sigma_max: float,
    x_center: torch.Tensor | None = None,
    churn_noise: NoiseFn | None = None,
    tiles_per_batch: int = 1,  # 0: all tiles of a step in one call (split by the denoiser if memory runs out)
    centered_weights: bool = False,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """`restore_edm` on overlapping tiles, each step blended with Gaussian weights (spec §3.8).

    denoise(x_tiles, sigma_hat, α, windows) gets the crops of `windows` stacked along the batch
    (len(windows) · B rows) and crops whatever per-tile conditioning it holds itself.
    """
    churn_noise = churn_noise or noise_from(None)
    steps = len(sigmas) - 1
    gamma = settings.gamma(steps)
    windows = tile_windows(noise.shape[-2], noise.shape[-1], tile, stride)
    tiles_per_batch = tiles_per_batch or len(windows)
    weights = gaussian_weights(tile, centered_weights).to(noise.device)
    x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    for i in range(steps):
        _stop_if_asked(should_stop, i, steps)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        alpha = settings.alpha(sigma, sigma_max)
        xi = churn_noise(i, x)  # one full-size field per step, sliced per tile
        acc, count = torch.zeros_like(x), torch.zeros_like(x)
        info: dict[str, Any] = {}
        for first in range(0, len(windows), tiles_per_batch):
            group = windows[first : first + tiles_per_batch]

            def crops(t: torch.Tensor, group: list[Window] = group) -> torch.Tensor:
                return torch.cat([t[..., h0:h1, w0:w1] for h0, h1, w0, w1 in group])

            def denoise_group(
                xc: torch.Tensor, sh: torch.Tensor, a: float, group: list[Window] = group
            ) -> torch.Tensor:
                return denoise(xc, sh, a, group)

            out, info = edm_step(
                denoise_group,
                crops(x),
                sigma,
                sigma_next,
                gamma=gamma,
                alpha=alpha,
                settings=settings,
                sigma_max=sigma_max,
                churn=crops(xi) if gamma > 0 else None,
                x_center=crops(x_center) if x_center is not None else None,
            )
            for (h0, h1, w0, w1), y in zip(group, out.chunk(len(group)), strict=True):
                acc[..., h0:h1, w0:w1] += y * weights  # float64 product, accumulated in x's dtype
                count[..., h0:h1, w0:w1] += weights
        x = acc / count
        if callback is not None:
            callback(
                {"x": x, "i": i, "steps": steps, "sigma": sigma, "sigma_hat": info["sigma_hat"], "control_scale": alpha}
            )
    return x


def restore_dpmpp_2m(
    denoise: GuidedDenoise,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    settings: RestoreSettings = RestoreSettings(),
    sigma_max: float,
    init_sigma: float | None = None,
    eta: float = 1.0,
    x_center: torch.Tensor | None = None,
    step_noise: NoiseFn | None = None,
    full_guidance: bool = False,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022) as SUPIR's RestoreDPMPP2MSampler steps it (FORMAT.md §4.7).

    x_0 = ε·√(1 + init_sigma²) (SUPIR scales by the legacy grid's σ_0, not the Karras one). Each step:
    x ← (σ'/σ)e^{−ηh}·x + a·D with a = 1 − e^{−(1+η)h}, h = ln σ − ln σ'; from step 1 on the 2M correction
    a·(D − D_prev)/(2r), r = h_prev/h, and the noise ξ·σ'·√(1 − e^{−2ηh})·s_noise (ξ = step_noise(i − 1): none on
    step 0); the last step (σ' = 0) returns D. Churn, the control ramp and restoration guidance are ignored, as
    the official sampler ignores them, unless full_guidance is set: then the ramp and the x0 blend apply on σ_i.
    """
    step_noise = step_noise or noise_from(None)
    steps = len(sigmas) - 1
    x = noise * math.sqrt(1.0 + (float(sigmas[0]) if init_sigma is None else init_sigma) ** 2)
    old_denoised: torch.Tensor | None = None
    h_last = 0.0
    for i in range(steps):
        _stop_if_asked(should_stop, i, steps)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        alpha = settings.alpha(sigma, sigma_max) if full_guidance else settings.control_scale
        denoised_cfg = denoise(x, x.new_full((x.shape[0],), sigma), alpha)
        denoised = (
            settings.guide(denoised_cfg, x_center, sigma, sigma_next, sigma_max) if full_guidance else denoised_cfg
        )
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)  # step in half-log-SNR, t = −log σ
            a = -math.expm1(-(1.0 + eta) * h)
            x = (sigma_next / sigma) * math.exp(-eta * h) * x + a * denoised
            if old_denoised is not None:
                x = x + a * (h / (2.0 * h_last)) * (denoised - old_denoised)
                if eta > 0:  # ξ·σ'·√(1 − e^{−2ηh})·s_noise; no draw on step 0 (the official sampler draws none)
                    scale = sigma_next * math.sqrt(-math.expm1(-2.0 * eta * h)) * settings.s_noise
                    x = x + step_noise(i - 1, x) * scale
            h_last = h
        old_denoised = denoised
        if callback is not None:
            info = {"sigma": sigma, "sigma_hat": sigma, "control_scale": alpha, "denoised_cfg": denoised_cfg}
            callback({"x": x, "i": i, "steps": steps, **info, "denoised": denoised})
    return x
