"""Validated parameters → one sampler run: the settings, the sigmas, which sampler, and the guided denoiser it calls.

The one place where parameters meet the sampler loops. Every name is RestoreParams' public one, from the API down
to the loops' keyword arguments (restoration_scale, linear_control_scale, cfg_scale_start, cfg_scale, step_noise,
…). The pipeline builds `RestoreSettings.from_params(params)` and calls `sample`; the conformance runner maps a
fixture's official names onto these once, at its edge, and calls the same `sample`.

    settings = RestoreSettings.from_params(validate_params({"steps": 30}))
    latent = sample(settings, Denoiser(model.eps), noise, cond, uncond, x_center=x_center)

The loops themselves (`supir_core.sampling`) are functions over a denoiser callable; `linear_cfg` / `tiled_cfg`
bind the network and both sides of classifier-free guidance into that callable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from .denoiser import Conditioning, Denoiser
from .memory import free_device_cache, is_out_of_memory
from .params import RestoreParams
from .sampling import (
    RESTORATION_MIN_SIGMA,
    Callback,
    GuidedDenoise,
    NoiseFn,
    TiledDenoise,
    restore_dpmpp_2m,
    restore_edm,
    restore_edm_tiled,
)
from .schedules import dpmpp_sigmas, sampling_sigmas
from .tiling import Window


@dataclass(frozen=True)
class RestoreSettings:
    """What a sampler run is told, under RestoreParams' names and meanings (see its field descriptions).

    Build it with `from_params`; the last two fields are constants of the official code, not public parameters
    (a conformance fixture may restate them)."""

    sampler: Literal["edm", "dpmpp_2m"]
    steps: int
    cfg_scale: float  # w at σ = 0
    cfg_scale_start: float  # w at σ_max, when linear_cfg
    linear_cfg: bool
    control_scale: float  # α at σ = 0
    control_scale_start: float  # α at σ_max, when linear_control_scale
    linear_control_scale: bool
    restoration_scale: float  # τ of restoration guidance; ≤ 0 off
    s_churn: float
    s_noise: float
    dpmpp_full_guidance: bool
    tile_size: int  # latent pixels, when the run is tiled
    tile_stride: int
    tiles_per_batch: int  # 0: as many as memory allows (the pipeline's plan; all tiles when nothing plans it)
    centered_tile_weights: bool
    restoration_min_sigma: float = RESTORATION_MIN_SIGMA
    eta: float = 1.0  # DPM++'s SDE noise level

    @classmethod
    def from_params(cls, params: RestoreParams) -> RestoreSettings:
        """The sampler's part of validated parameters (every field of the same name)."""
        public = {f.name for f in fields(cls)} & set(RestoreParams.model_fields)
        return cls(**{name: getattr(params, name) for name in public})

    @property
    def cfg_scale_at_start(self) -> float:
        """w at σ_max: cfg_scale_start with linear_cfg, else cfg_scale (constant guidance)."""
        return self.cfg_scale_start if self.linear_cfg else self.cfg_scale

    def tile(self, latent_hw: tuple[int, ...]) -> tuple[int, int]:
        """(tile, stride) of a tiled run on a latent of this size: at most the latent's shorter side."""
        tile = min(self.tile_size, *latent_hw)
        return tile, min(self.tile_stride, tile)


def sampler_sigmas(settings: RestoreSettings, train_sigmas: torch.Tensor) -> torch.Tensor:
    """The steps + 1 sigmas the run visits: the legacy grid (EDM) or the Karras grid between its ends (DPM++)."""
    if settings.sampler == "dpmpp_2m":
        return dpmpp_sigmas(settings.steps, train_sigmas)
    return sampling_sigmas(settings.steps, train_sigmas)


def sample(
    settings: RestoreSettings,
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    *,
    x_center: torch.Tensor | None = None,
    step_noise: NoiseFn | None = None,
    tiled: bool = False,
    tile_conds: Mapping[Window, Conditioning] | None = None,
    tile_batch: TileBatch | None = None,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """One sampler run from unscaled noise: the latent (spec §3; FORMAT.md §4.1, §4.2, §4.7).

    cond / uncond: both sides of CFG (control = the LQ latent, full-size); x_center: the restoration guidance anchor;
    step_noise: each step's noise (EDM: churn, DPM++: SDE noise), the global RNG when None; tiled: the EDM sampler
    on overlapping tiles (DPM++ never tiles), tile_conds: a tile's own positive side, by window; tile_batch: how
    many tiles go into one network call (default: settings.tiles_per_batch, 0 = all)."""
    sigmas = sampler_sigmas(settings, denoiser.train_sigmas)
    run: dict[str, Any] = {  # what every sampler takes, under the same names
        "sigma_max": denoiser.sigma_max,
        "s_noise": settings.s_noise,
        "control_scale": settings.control_scale,
        "control_scale_start": settings.control_scale_start,
        "linear_control_scale": settings.linear_control_scale,
        "restoration_scale": settings.restoration_scale,
        "restoration_min_sigma": settings.restoration_min_sigma,
        "x_center": x_center,
        "step_noise": step_noise,
        "callback": callback,
        "should_stop": should_stop,
    }
    if settings.sampler == "dpmpp_2m":
        if tiled:
            raise ValueError("the DPM++ sampler runs untiled")
        return restore_dpmpp_2m(
            linear_cfg(denoiser, cond, uncond, settings.cfg_scale_at_start, settings.cfg_scale),
            noise,
            sigmas,
            init_sigma=float(sampling_sigmas(settings.steps, denoiser.train_sigmas)[0]),  # the legacy grid's σ_0
            eta=settings.eta,
            full_guidance=settings.dpmpp_full_guidance,
            **run,
        )
    if not tiled:
        guided = linear_cfg(denoiser, cond, uncond, settings.cfg_scale_at_start, settings.cfg_scale)
        return restore_edm(guided, noise, sigmas, s_churn=settings.s_churn, **run)
    tile, stride = settings.tile(tuple(noise.shape[-2:]))
    tile_batch = tile_batch or TileBatch(settings.tiles_per_batch)
    return restore_edm_tiled(
        tiled_cfg(denoiser, tile_conds or cond, uncond, settings.cfg_scale_at_start, settings.cfg_scale, tile_batch),
        noise,
        sigmas,
        tile=tile,
        stride=stride,
        s_churn=settings.s_churn,
        tiles_per_batch=tile_batch.limit,
        centered_tile_weights=settings.centered_tile_weights,
        **run,
    )


def linear_cfg(
    denoiser: Denoiser, cond: Conditioning, uncond: Conditioning, cfg_scale_start: float, cfg_scale: float
) -> GuidedDenoise:
    """D = D_u + w(σ̂)(D_c − D_u), w going linearly from cfg_scale_start at σ_max to cfg_scale at σ = 0 (spec §3.3).

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
        w = (cfg_scale_start - cfg_scale) * sigma_hat / sigma_max + cfg_scale
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


@dataclass
class TileBatch:
    """How many tiles go into one network call of a tiled run: at most `limit` (0: all), lowered to what fitted
    when the device runs out of memory. A pipeline keeps one across jobs, so a job after an out-of-memory error
    starts at the size that fitted instead of failing again (and compiling a new shape for every halved group)."""

    limit: int = 0
    lowered: int = 0  # out-of-memory errors that lowered it

    def fits(self, tiles: int) -> bool:
        return not self.limit or tiles <= self.limit

    def lower(self, failed: int) -> None:
        """`failed` tiles in one call ran out of memory: half of them is the new limit."""
        self.limit = (failed + 1) // 2
        self.lowered += 1


def tiled_cfg(
    denoiser: Denoiser,
    cond: Conditioning | Mapping[Window, Conditioning],
    uncond: Conditioning,
    cfg_scale_start: float,
    cfg_scale: float,
    batch: TileBatch | None = None,
) -> TiledDenoise:
    """`linear_cfg` for `restore_edm_tiled`: crops the full-size control latent to each window.

    cond may map each window to its own Conditioning (per-tile prompts); controls are full-size.
    A group of windows that runs out of device memory (in any of its forms: `memory.is_out_of_memory`) is split
    in halves until it fits, and `batch` keeps the size that fitted: later groups, steps and jobs sharing it are
    cut to that size before they are tried.
    """
    batch = batch if batch is not None else TileBatch()

    def guided(x: torch.Tensor, sigma_hat: torch.Tensor, control_scale: float, windows: list[Window]) -> torch.Tensor:
        conds = [_crop(cond[w] if isinstance(cond, Mapping) else cond, w) for w in windows]
        unconds = [_crop(uncond, w) for w in windows]
        return linear_cfg(denoiser, _stack(conds), _stack(unconds), cfg_scale_start, cfg_scale)(
            x, sigma_hat, control_scale
        )

    def denoise(x: torch.Tensor, sigma_hat: torch.Tensor, control_scale: float, windows: list[Window]) -> torch.Tensor:
        if batch.fits(len(windows)):
            try:
                return guided(x, sigma_hat, control_scale, windows)
            except Exception as exc:
                if len(windows) == 1 or not is_out_of_memory(exc):
                    raise
            # out of the except block: the error and the frames holding the failed call's tensors are gone
            free_device_cache(x.device)
            batch.lower(len(windows))
        rows, size = x.shape[0] // len(windows), batch.limit
        parts = []
        for first in range(0, len(windows), size):
            part = windows[first : first + size]
            rs = slice(first * rows, (first + len(part)) * rows)
            parts.append(denoise(x[rs], sigma_hat[rs], control_scale, part))
        return torch.cat(parts)

    return denoise
