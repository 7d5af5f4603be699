"""Tile windows and blend weights for tiled sampling (spec §3.8)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Window = tuple[int, int, int, int]  # (h0, h1, w0, w1) in latent pixels
GAUSSIAN_VAR = 0.01


def _starts(length: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, length - tile + 1, stride))
    if (length - tile) % stride:
        starts.append(length - tile)  # a last window flush with the border
    return starts


def tile_windows(height: int, width: int, tile: int, stride: int) -> list[Window]:
    """Row-major windows of tile × tile covering height × width with the given stride."""
    if tile > height or tile > width:
        raise ValueError(f"tile {tile} is larger than the latent {height}×{width}")
    if not 0 < stride <= tile:
        raise ValueError(f"tile stride must be in 1..{tile}, got {stride}")
    return [
        (h0, h0 + tile, w0, w0 + tile) for h0 in _starts(height, tile, stride) for w0 in _starts(width, tile, stride)
    ]


def gaussian_weights(tile: int, centered: bool = False) -> torch.Tensor:
    """Separable Gaussian blend weights [tile, tile], float64, variance 0.01 of the tile size.

    The official weights centre rows at T/2 but columns at (T−1)/2; `centered` puts both at (T−1)/2.
    """

    def g(centre: float) -> torch.Tensor:
        u = torch.arange(tile, dtype=torch.float64)
        return torch.exp(-((u - centre) ** 2) / (2 * GAUSSIAN_VAR * tile * tile)) / math.sqrt(
            2 * math.pi * GAUSSIAN_VAR
        )

    row_centre = (tile - 1) / 2 if centered else tile / 2
    return g(row_centre)[:, None] * g((tile - 1) / 2)[None, :]


def _spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    if length <= tile:
        return [(0, length)]
    return [(s, s + tile) for s in _starts(length, tile, tile - overlap)]


def _ramp(length: int, feather: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1 inside, rising linearly over `feather` samples at each side that meets another tile."""
    w = torch.ones(length, dtype=torch.float64)
    ramp = torch.arange(1, feather + 1, dtype=torch.float64) / (feather + 1)
    n = min(feather, length)
    if at_start:
        w[:n] = torch.minimum(w[:n], ramp[:n])
    if at_end:
        w[length - n :] = torch.minimum(w[length - n :], ramp[:n].flip(0))
    return w


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, factor: float
) -> torch.Tensor:
    """Apply a size-scaling map (VAE encode: factor 1/8, decode: 8) on overlapping tiles of x and feather-blend.

    Peak memory is that of one tile's activations; every GroupNorm sees only its tile, so the result is
    close to, not equal to, the untiled one.
    """
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return fn(x)
    out: torch.Tensor | None = None
    weight_sum: torch.Tensor | None = None
    feather = max(int(overlap * factor) // 2, 1)
    rows, cols = _spans(height, tile, overlap), _spans(width, tile, overlap)
    for h0, h1 in rows:
        for w0, w1 in cols:
            y = fn(x[..., h0:h1, w0:w1]).float()
            oh0, ow0 = round(h0 * factor), round(w0 * factor)
            oh1, ow1 = oh0 + y.shape[-2], ow0 + y.shape[-1]
            if out is None:
                shape = (*y.shape[:-2], round(height * factor), round(width * factor))
                out = y.new_zeros(shape)
                weight_sum = y.new_zeros(shape[-2:])
            wy = _ramp(y.shape[-2], feather, h0 > 0, h1 < height)
            wx = _ramp(y.shape[-1], feather, w0 > 0, w1 < width)
            weight = (wy[:, None] * wx[None, :]).to(y)
            out[..., oh0:oh1, ow0:ow1] += y * weight
            weight_sum[oh0:oh1, ow0:ow1] += weight  # type: ignore[index]
    assert out is not None and weight_sum is not None
    return out / weight_sum
