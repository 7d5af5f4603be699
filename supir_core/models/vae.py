"""SDXL's VAE and SUPIR's degradation-robust encoder, which shares the VAE's quant_conv (spec §1.4, §4.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import Encoder
from torch import nn

from ..tiling import tiled_map

SDXL_SCALE_FACTOR = 0.13025
TILE_OVERLAP_DIV = 4  # tiles overlap by a quarter of their side, as diffusers tiles its VAE


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
    """Encode/decode in the *scaled* latent space the sampler works in (latent = s · z)."""

    def __init__(self, spec: VAESpec, scale_factor: float = SDXL_SCALE_FACTOR) -> None:
        super().__init__()
        self.autoencoder = spec.build()
        self.robust_encoder = spec.build_encoder()
        self.scale_factor = scale_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.autoencoder.quant_conv.weight.dtype

    def _moments(self, encoder: nn.Module, image: torch.Tensor, tile: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        def moments(x: torch.Tensor) -> torch.Tensor:
            return self.autoencoder.quant_conv(encoder(x.to(self.dtype))).float()

        both = moments(image) if tile is None else tiled_map(moments, image, tile, tile // TILE_OVERLAP_DIV, 1 / 8)
        mean, logvar = both.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode_lq(self, image: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Control latent of a low-quality image: s · posterior mean of the degradation-robust encoder.

        tile (image pixels) bounds memory for large images by encoding overlapping tiles.
        """
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

        def decode(z: torch.Tensor) -> torch.Tensor:
            return self.autoencoder.decoder(
                self.autoencoder.post_quant_conv((z / self.scale_factor).to(self.dtype))
            ).float()

        if tile is None:
            return decode(latent)
        return tiled_map(decode, latent, tile // 8, tile // 8 // TILE_OVERLAP_DIV, 8)
