"""SUPIR's connectors between the adaptor and the frozen SDXL decoder (spec §1.5–1.7).

Parameter names follow the official checkpoint (`project_modules.<i>.*`), so those keys load 1:1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

# Both connectors normalise with 32-group GroupNorm at eps 1e-5 (sgm's `normalization`).
GROUPS = 32
NORM_EPS = 1e-5
CROSS_ATTN_HEAD_WIDTH = 64
SFT_HIDDEN = 128


class ZeroSFT(nn.Module):
    """Spatial feature transform of the decoder input by an adaptor feature, blended by the control scale."""

    def __init__(self, label_nc: int, norm_nc: int, concat_channels: int = 0, nhidden: int = SFT_HIDDEN) -> None:
        super().__init__()
        channels = norm_nc + concat_channels
        self.param_free_norm = nn.GroupNorm(GROUPS, channels, eps=NORM_EPS, affine=True)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, 3, padding=1), nn.SiLU())
        self.zero_mul = nn.Conv2d(nhidden, channels, 3, padding=1)
        self.zero_add = nn.Conv2d(nhidden, channels, 3, padding=1)
        self.zero_conv = nn.Conv2d(label_nc, norm_nc, 1)

    def forward(
        self,
        control: torch.Tensor,
        skip: torch.Tensor,
        hidden: torch.Tensor | None = None,
        scale: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """out = α·(GN(u)(1 + γ(c)) + β(c)) + (1 − α)·raw.

        u = [hidden, skip + zero_conv(c)] and raw = [hidden, skip] (just skip after the middle block).
        """
        shifted = skip + self.zero_conv(control)
        if hidden is None:  # after the middle block: no concatenation
            raw, mixed = skip, shifted
        else:  # decoder input: same [hidden, skip] order as SDXL's own skip concat
            raw, mixed = torch.cat([hidden, skip], dim=1), torch.cat([hidden, shifted], dim=1)
        actv = self.mlp_shared(control)
        modulated = self.param_free_norm(mixed) * (1 + self.zero_mul(actv)) + self.zero_add(actv)
        return scale * modulated + (1 - scale) * raw


class ZeroCrossAttn(nn.Module):
    """Full cross-attention from the decoder map (queries) to an adaptor feature map (keys/values)."""

    def __init__(self, context_dim: int, query_dim: int) -> None:
        super().__init__()
        heads = max(query_dim // CROSS_ATTN_HEAD_WIDTH, 1)
        self.norm1 = nn.GroupNorm(GROUPS, query_dim, eps=NORM_EPS, affine=True)
        self.norm2 = nn.GroupNorm(GROUPS, context_dim, eps=NORM_EPS, affine=True)
        self.attn = Attention(
            query_dim,
            cross_attention_dim=context_dim,
            heads=heads,
            dim_head=CROSS_ATTN_HEAD_WIDTH,
            bias=False,
            out_bias=True,
        )

    def forward(self, control: torch.Tensor, hidden: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """out = x + α · Attn(GN₁(x), GN₂(c)) over all h·w positions."""
        b, ch, h, w = hidden.shape
        queries = self.norm1(hidden).flatten(2).transpose(1, 2)  # [B, h*w, C]
        context = self.norm2(control).flatten(2).transpose(1, 2)  # [B, h*w, Cc]
        attended = self.attn(queries, encoder_hidden_states=context)
        return hidden + scale * attended.transpose(1, 2).reshape(b, ch, h, w)


@dataclass(frozen=True)
class ConnectorSpec:
    """One `project_modules.<i>` entry: a ZeroSFT (label_nc, norm_nc, concat) or a ZeroCrossAttn (context, query)."""

    kind: str  # "sft" | "cross_attn"
    control_channels: int
    channels: int
    concat_channels: int = 0

    def build(self) -> nn.Module:
        if self.kind == "sft":
            return ZeroSFT(self.control_channels, self.channels, self.concat_channels)
        return ZeroCrossAttn(self.control_channels, self.channels)
