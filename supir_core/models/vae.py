"""SDXL's VAE and SUPIR's degradation-robust encoder, which shares the VAE's quant_conv (spec §1.4, §4.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import Encoder
from torch import nn

from .vae_tiling import ChunkGrid, Conv, Op, alignment, decoder_ops, encoder_ops, run_tiled

SDXL_SCALE_FACTOR = 0.13025


@dataclass(frozen=True)
class VAESpec:
    """Sizes of an LDM AutoencoderKL, read from a checkpoint's tensor shapes."""

    block_channels: tuple[int, ...]  # ch · ch_mult
    layers_per_block: int
    latent_channels: int = 4
    image_channels: int = 3

    def build(self) -> AutoencoderKL:
        n = len(self.block_channels)
        return AutoencoderKL(
            in_channels=self.image_channels,
            out_channels=self.image_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=self.block_channels,
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=32,
            scaling_factor=SDXL_SCALE_FACTOR,
        )

    def build_encoder(self) -> Encoder:
        return Encoder(
            in_channels=self.image_channels,
            out_channels=self.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * len(self.block_channels),
            block_out_channels=self.block_channels,
            layers_per_block=self.layers_per_block,
            norm_num_groups=32,
            double_z=True,
        )


class SupirVAE(nn.Module):
    """Encode/decode in the *scaled* latent space the sampler works in (latent = s · z).

    tile (image pixels) bounds memory for large images: the networks run chunk by chunk on cores of at most
    tile × tile (decoding: tile / 8 latent pixels) and give the untiled result up to float rounding
    (supir_core/models/vae_tiling.py). map_device: where the full-size maps between chunked layers live (None: the
    device of the input; e.g. "cpu" for images whose maps do not fit on the accelerator).
    """

    def __init__(self, spec: VAESpec, scale_factor: float = SDXL_SCALE_FACTOR) -> None:
        super().__init__()
        self.autoencoder = spec.build()
        self.robust_encoder = spec.build_encoder()
        self.scale_factor = scale_factor
        self.map_device: torch.device | str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.autoencoder.quant_conv.weight.dtype

    def _tiled(self, ops: list[Op], x: torch.Tensor, tile: int) -> torch.Tensor:
        grid = ChunkGrid.split(x.shape[-2], x.shape[-1], tile, alignment(ops))
        return run_tiled(ops, x, grid, None if self.map_device is None else torch.device(self.map_device))

    def _moments(self, encoder: Encoder, image: torch.Tensor, tile: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.to(self.dtype)
        if _fits(x, tile):
            both = self.autoencoder.quant_conv(encoder(x))
        else:
            assert tile is not None
            both = self._tiled([*encoder_ops(encoder), Conv(self.autoencoder.quant_conv)], x, tile)
        mean, logvar = both.float().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode_lq(self, image: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Control latent of a low-quality image: s · posterior mean of the degradation-robust encoder."""
        mean, _ = self._moments(self.robust_encoder, image, tile)
        return self.scale_factor * mean

    def encode(self, image: torch.Tensor, noise: torch.Tensor | None = None, tile: int | None = None) -> torch.Tensor:
        """s · (mean + std · noise) with the plain SDXL encoder; noise None gives the posterior mean."""
        mean, logvar = self._moments(self.autoencoder.encoder, image, tile)
        if noise is None:
            return self.scale_factor * mean
        return self.scale_factor * (mean + torch.exp(0.5 * logvar) * noise.to(mean))

    def decode(self, latent: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Image in about [−1, 1] (not clamped) from a scaled latent; tile in image pixels, as for encoding."""
        z = (latent / self.scale_factor).to(self.dtype)
        latent_tile = None if tile is None else max(tile // 8, 1)
        if _fits(z, latent_tile):
            return self.autoencoder.decoder(self.autoencoder.post_quant_conv(z)).float()
        assert latent_tile is not None
        ops = [Conv(self.autoencoder.post_quant_conv), *decoder_ops(self.autoencoder.decoder)]
        return self._tiled(ops, z, latent_tile).float()


def _fits(x: torch.Tensor, tile: int | None) -> bool:
    """Whether x runs whole: no tiling asked, or no side longer than one tile."""
    return tile is None or max(x.shape[-2:]) <= tile
