"""Colour correction of the restored image towards the stage-1 image (spec §4.3). Tensors in [−1, 1], NCHW."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ColorFix = Literal["wavelet", "adain", "none"]
WAVELET_DILATIONS = (1, 2, 4, 8, 16)


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """Depthwise 3×3 binomial blur ([1,2,1]ᵀ[1,2,1]/16) at the given dilation, replicate-padded to keep the size."""
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (k1[:, None] * k1[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=x.shape[1], dilation=dilation)


def wavelet_decompose(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): à-trous decomposition over five dilations; x = high + low."""
    high = torch.zeros_like(x)
    for dilation in WAVELET_DILATIONS:
        low = _blur(x, dilation)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_color_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """High frequencies of content, low frequencies (colour, shading) of style."""
    return wavelet_decompose(content)[0] + wavelet_decompose(style)[1]


def adain_color_fix(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per image and channel, match content's mean and std (unbiased variance + eps) to style's."""

    def stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = t.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1, unbiased=True) + eps).sqrt()[..., None, None]

    mean_c, std_c = stats(content)
    mean_s, std_s = stats(style)
    return (content - mean_c) / std_c * std_s + mean_s


def color_fix(content: torch.Tensor, style: torch.Tensor, method: ColorFix) -> torch.Tensor:
    if method == "wavelet":
        return wavelet_color_fix(content, style)
    if method == "adain":
        return adain_color_fix(content, style)
    return content
