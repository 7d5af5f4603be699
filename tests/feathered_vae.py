"""The counter-example to supir_core/models/vae_tiling.py: the VAE on independent overlapping tiles, feather-blended.

This was the service's tiled VAE before the chunked executor. Every tile's GroupNorms see only that tile and the
attention only its tokens, so the result is close to the untiled one but not equal to it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from supir_core.models.vae import SupirVAE

OVERLAP_DIV = 4  # tiles overlap by a quarter of their side


def _spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Tile spans along one axis; the last one flush with the end."""
    if length <= tile:
        return [(0, length)]
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return [(s, s + tile) for s in starts]


def _ramp(length: int, feather: int, rises: bool, falls: bool) -> torch.Tensor:
    """Blend weight along one axis: 1, ramping down linearly over `feather` samples on each side shared with a tile."""
    weight = torch.ones(length, dtype=torch.float64)
    n = min(feather, length)
    ramp = torch.arange(1, n + 1, dtype=torch.float64) / (feather + 1)
    if rises:
        weight[:n] = torch.minimum(weight[:n], ramp)
    if falls:
        weight[length - n :] = torch.minimum(weight[length - n :], ramp.flip(0))
    return weight


def feathered_map(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, factor: float
) -> torch.Tensor:
    """fn (output size = factor × input size) on overlapping tile × tile windows of x, blended with linear ramps."""
    height, width = x.shape[-2:]
    overlap = tile // OVERLAP_DIV
    feather = max(int(overlap * factor) // 2, 1)
    total: torch.Tensor | None = None
    weights = torch.zeros(round(height * factor), round(width * factor), dtype=torch.float64)
    for h0, h1 in _spans(height, tile, overlap):
        for w0, w1 in _spans(width, tile, overlap):
            y = fn(x[..., h0:h1, w0:w1]).double()
            if total is None:
                total = y.new_zeros((*y.shape[:-2], *weights.shape))
            weight = _ramp(y.shape[-2], feather, h0 > 0, h1 < height)[:, None]
            weight = weight * _ramp(y.shape[-1], feather, w0 > 0, w1 < width)[None, :]
            top, left = round(h0 * factor), round(w0 * factor)
            total[..., top : top + y.shape[-2], left : left + y.shape[-1]] += y * weight
            weights[top : top + y.shape[-2], left : left + y.shape[-1]] += weight
    assert total is not None
    return (total / weights).float()


def _moments(vae: SupirVAE, encoder: torch.nn.Module, image: torch.Tensor, tile: int) -> torch.Tensor:
    def moments(x: torch.Tensor) -> torch.Tensor:
        return vae.autoencoder.quant_conv(encoder(x.to(vae.dtype))).float()

    return feathered_map(moments, image, tile, 1 / 8)


def encode_lq(vae: SupirVAE, image: torch.Tensor, tile: int) -> torch.Tensor:
    mean, _ = _moments(vae, vae.robust_encoder, image, tile).chunk(2, dim=1)
    return vae.scale_factor * mean


def encode(vae: SupirVAE, image: torch.Tensor, noise: torch.Tensor, tile: int) -> torch.Tensor:
    mean, logvar = _moments(vae, vae.autoencoder.encoder, image, tile).chunk(2, dim=1)
    return vae.scale_factor * (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean))


def decode(vae: SupirVAE, latent: torch.Tensor, tile: int) -> torch.Tensor:
    def run(z: torch.Tensor) -> torch.Tensor:
        z = (z / vae.scale_factor).to(vae.dtype)
        return vae.autoencoder.decoder(vae.autoencoder.post_quant_conv(z)).float()

    return feathered_map(run, latent, tile // 8, 8)
