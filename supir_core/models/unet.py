"""The frozen SDXL UNet with SUPIR's decoder path, and the adaptor (spec §1.2, §1.3, §1.8).

Both networks are diffusers modules. The encoder half runs diffusers' own down/mid blocks; the
decoder half re-uses diffusers' up-block submodules but replaces every skip concatenation by a
ZeroSFT connector and adds a ZeroCrossAttn before each upsampler, which diffusers' up blocks
cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .connectors import ConnectorSpec


@dataclass(frozen=True)
class UNetSpec:
    """Sizes of an SDXL-layout UNet, read from a checkpoint's tensor shapes (plus the head width)."""

    in_channels: int
    out_channels: int
    block_channels: tuple[int, ...]  # width per level: 320, 640, 1280 for SDXL
    layers_per_block: int
    transformer_depth: tuple[int, ...]  # per level; 0 = no attention at that level
    context_dim: int
    adm_in_channels: int
    size_embed_dim: int  # D of the size sinusoids inside the ADM vector (256 for SDXL)
    head_width: int = 64

    def diffusers_config(self) -> dict[str, Any]:
        attn = [d > 0 for d in self.transformer_depth]
        return {
            "sample_size": 128,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            "block_out_channels": self.block_channels,
            "layers_per_block": self.layers_per_block,
            "transformer_layers_per_block": tuple(max(d, 1) for d in self.transformer_depth),
            "attention_head_dim": tuple(max(c // self.head_width, 1) for c in self.block_channels),
            "cross_attention_dim": self.context_dim,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": self.size_embed_dim,
            "projection_class_embeddings_input_dim": self.adm_in_channels,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
        }

    def build_base(self) -> UNet2DConditionModel:
        return UNet2DConditionModel(**self.diffusers_config())

    def skip_channels(self) -> list[int]:
        """Channels of the encoder outputs the decoder consumes as skips (and the adaptor mirrors as features)."""
        chans = [self.block_channels[0]]
        for level, width in enumerate(self.block_channels):
            chans += [width] * self.layers_per_block
            if level < len(self.block_channels) - 1:
                chans.append(width)  # downsampler output keeps the width
        return chans

    def connector_specs(self) -> list[ConnectorSpec]:
        """`project_modules` in index order, derived the way the decoder applies them (index 11 first)."""
        skips = self.skip_channels()
        mid = self.block_channels[-1]
        applied = [ConnectorSpec("sft", mid, mid, 0)]
        hidden = mid
        for level, width in enumerate(reversed(self.block_channels)):
            for _ in range(self.layers_per_block + 1):
                skip = skips.pop()
                applied.append(ConnectorSpec("sft", skip, skip, hidden))
                hidden = width
            if level < len(self.block_channels) - 1:  # before this up block's upsampler
                applied.append(ConnectorSpec("cross_attn", skip, hidden))
        return applied[::-1]


# `net` is diffusers' UNet2DConditionModel or the Adaptor: both carry the same submodules.
def _embedding(net: Any, timesteps: torch.Tensor, vector: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """emb = time_embedding(sinusoid(t)) + add_embedding(y): the ADM vector y is given whole, not rebuilt."""
    t_emb = net.time_proj(timesteps).to(dtype)
    return net.time_embedding(t_emb) + net.add_embedding(vector.to(dtype))


def _encode(
    net: Any,
    h: torch.Tensor,
    emb: torch.Tensor,
    context: torch.Tensor,
    hint: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Run conv_in, the down blocks and the mid block; return the skips followed by the mid-block output."""
    h = net.conv_in(h)
    if hint is not None:
        h = h + hint  # the adaptor adds its LQ hint right after block 0
    features = [h]
    for block in net.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, outs = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, outs = block(hidden_states=h, temb=emb)
        features.extend(outs)
    features.append(net.mid_block(h, emb, encoder_hidden_states=context))
    return features


class Adaptor(nn.Module):
    """GLVControl: a trainable copy of the UNet encoder + middle block with a hint conv on the LQ latent."""

    def __init__(self, spec: UNetSpec) -> None:
        super().__init__()
        encoder = spec.build_base()
        self.conv_in = encoder.conv_in
        self.time_proj = encoder.time_proj
        self.time_embedding = encoder.time_embedding
        self.add_embedding = encoder.add_embedding
        self.down_blocks = encoder.down_blocks
        self.mid_block = encoder.mid_block
        self.hint_conv = nn.Conv2d(spec.in_channels, spec.block_channels[0], 3, padding=1)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        vector: torch.Tensor,
        hint: torch.Tensor,
    ) -> list[torch.Tensor]:
        """The 10 control features c0…c9 (skips + middle) for the noisy input x = c_in·z and the LQ latent hint."""
        dtype = self.conv_in.weight.dtype
        x, context, hint = x.to(dtype), context.to(dtype), hint.to(dtype)
        emb = _embedding(self, timesteps, vector, dtype)
        return _encode(self, x, emb, context, hint=self.hint_conv(hint))


class SupirUNet(nn.Module):
    """SDXL's UNet (`base`, a diffusers UNet2DConditionModel) plus the 12 `project_modules` connectors."""

    def __init__(self, spec: UNetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.base = spec.build_base()
        self.project_modules = nn.ModuleList(c.build() for c in spec.connector_specs())

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        vector: torch.Tensor,
        control: list[torch.Tensor],
        control_scale: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """ε prediction; every connector blends its control feature in with the same scale α."""
        base = self.base
        dtype = base.conv_in.weight.dtype
        x, context = x.to(dtype), context.to(dtype)
        emb = _embedding(base, timesteps, vector, dtype)
        skips = _encode(base, x, emb, context)
        h = skips.pop()
        controls = [c.to(dtype) for c in control]
        connectors = iter(reversed(self.project_modules))

        h = next(connectors)(controls.pop(), h, scale=control_scale)
        for block in base.up_blocks:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for resnet, attn in zip(block.resnets, attentions, strict=True):
                c = controls.pop()
                h = next(connectors)(c, skips.pop(), h, scale=control_scale)
                h = resnet(h, emb)
                if attn is not None:
                    h = attn(h, encoder_hidden_states=context, return_dict=False)[0]
            if block.upsamplers is not None:
                h = next(connectors)(c, h, scale=control_scale)
                for upsampler in block.upsamplers:
                    h = upsampler(h)
        h = base.conv_out(base.conv_act(base.conv_norm_out(h)))
        return h.float()
