"""Tile windows and blend weights for tiled sampling (spec §3.8)."""

from __future__ import annotations

import math

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
