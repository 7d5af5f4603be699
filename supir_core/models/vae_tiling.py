"""Tiled VAE passes whose output equals the untiled network's, up to float rounding.

Running a VAE on independent overlapping tiles bounds its memory, but then every GroupNorm normalises with its own
tile's statistics and the mid-block attention sees only its own tile: the result drifts from the untiled one. Here
the network is executed in chunks without changing what it computes:

- A diffusers `Encoder` / `Decoder` is flattened into a list of ops that replays its forward pass: local ops
  (convolutions, pointwise functions, nearest upsampling, residual additions) and sync points (every GroupNorm,
  the mid-block self-attention), the only ops that mix information across the whole map.
- The input is cut into a grid of disjoint chunk cores whose boundaries fall on whole pixels at every resolution
  the network passes through (multiples of 8 image pixels for the encoder; any latent pixel for the decoder).
- Execution is layer-synchronous. Between sync points the state is full-size maps: the current activation and
  the saved residual inputs. The local ops up to the next sync point (a segment) run chunk by chunk: a chunk
  reads its core plus the halo the segment's receptive field needs, found by walking the segment's kernels,
  paddings, strides and upsamplings backwards from the core; the halo stops at the map's border, so the
  network's own zero padding is reproduced there. The core of each chunk's result is written into the next map.
- A GroupNorm gathers (count, mean, M2) of every chunk core per (sample, group) in float32 and merges them with
  Chan's parallel formula into the global mean and biased variance, which are the untiled GroupNorm's statistics;
  the normalisation itself is pointwise and opens the next segment.
- The attention projects keys and values on every chunk core (all positions of the map; attention does not care
  about their order), then each chunk's queries attend to all of them: the global attention, exactly.

Peak memory: a few full-size maps (optionally kept on another device, e.g. the CPU) plus one chunk's
activations. No Python control flow depends on tensor values, so the code runs under FakeTensorMode
(bench/memory_plan.py counts its activation bytes that way).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise
from math import lcm

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

Interval = tuple[int, int]  # [start, stop) along one axis, in pixels of the map at hand
Region = tuple[Interval, Interval]  # (rows, columns)
Origin = tuple[int, int]  # map coordinates (row, column) of a chunk crop's first pixel


# ---- local ops: output at a pixel depends on a bounded neighbourhood of the input --------------------------------


class LocalOp:
    """An op that runs chunk by chunk. The base geometry is pointwise; ops that widen or rescale override it."""

    def scale(self) -> Fraction:
        """Output pixels per input pixel along each axis."""
        return Fraction(1)

    def out_size(self, size: int) -> int:
        return size

    def needed(self, out: Interval, size: int) -> Interval:
        """The input interval (of a map `size` long) that output interval `out` depends on."""
        return out

    def out_start(self, start: int) -> int:
        """Map coordinate of the first output of a crop whose first input pixel is at `start`."""
        return start

    def __call__(self, x: torch.Tensor, origin: Origin) -> torch.Tensor:
        raise NotImplementedError


class Pointwise(LocalOp):
    """An elementwise function (activation, dropout)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def __call__(self, x: torch.Tensor, origin: Origin) -> torch.Tensor:
        return self.fn(x)


class Cast(LocalOp):
    """A dtype cast (older diffusers' Decoder casts the mid block's output to its up blocks' dtype)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, origin: Origin) -> torch.Tensor:
        return x.to(self.dtype)


class Conv(LocalOp):
    """An nn.Conv2d (square kernel; equal stride and padding on both axes), after an optional extra zero pad.

    extra_pad = (before, after) on both axes: Downsample2D pads (0, 1) itself when its convolution has no padding.
    """

    def __init__(self, module: nn.Conv2d, extra_pad: Interval = (0, 0)) -> None:
        (kh, kw), (sh, sw), padding = module.kernel_size, module.stride, module.padding
        if kh != kw or sh != sw or isinstance(padding, str) or padding[0] != padding[1]:
            raise NotImplementedError(f"tiling needs square kernels, strides and paddings: {module}")
        if module.dilation != (1, 1) or module.padding_mode != "zeros":
            raise NotImplementedError(f"tiling needs undilated, zero-padded convolutions: {module}")
        self.module, self.extra_pad = module, extra_pad
        self.kernel, self.stride = kh, sh
        self.pad = (extra_pad[0] + padding[0], extra_pad[1] + padding[0])

    def scale(self) -> Fraction:
        return Fraction(1, self.stride)

    def out_size(self, size: int) -> int:
        return (size + self.pad[0] + self.pad[1] - self.kernel) // self.stride + 1

    def needed(self, out: Interval, size: int) -> Interval:
        # output o reads padded input [o·s, o·s + k), i.e. map pixels [o·s − pad_before, o·s − pad_before + k)
        start = max(out[0] * self.stride - self.pad[0], 0)
        stop = min((out[1] - 1) * self.stride - self.pad[0] + self.kernel, size)
        return start - start % self.stride, stop  # a crop must start on the stride grid (see out_start)

    def out_start(self, start: int) -> int:
        if start % self.stride:
            raise AssertionError(f"crop at {start} is off the stride-{self.stride} grid")
        return start // self.stride

    def __call__(self, x: torch.Tensor, origin: Origin) -> torch.Tensor:
        before, after = self.extra_pad
        if before or after:
            x = F.pad(x, (before, after, before, after))
        return self.module(x)


class Upsample(LocalOp):
    """Nearest-neighbour ×2 (Upsample2D's F.interpolate)."""

    def scale(self) -> Fraction:
        return Fraction(2)

    def out_size(self, size: int) -> int:
        return 2 * size

    def needed(self, out: Interval, size: int) -> Interval:
        return out[0] // 2, (out[1] + 1) // 2

    def out_start(self, start: int) -> int:
        return 2 * start

    def __call__(self, x: torch.Tensor, origin: Origin) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Normalize(LocalOp):
    """The pointwise half of a GroupNorm, with the whole map's statistics gathered beforehand.

    One fused kernel, computing in float32 whatever the map's dtype: an eval-mode batch norm over the
    (sample, channel) planes, each given its group's mean and variance.
    """

    def __init__(self, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
        per_group = norm.num_channels // norm.num_groups  # mean, var: [B, groups], float32 (or float64)
        self.norm = norm
        self.mean = mean.repeat_interleave(per_group, dim=1).flatten()  # [B · C]
        self.var = var.repeat_interleave(per_group, dim=1).flatten()

    def __call__(self, x: torch.Tensor, origin: Origin) -> torch.Tensor:
        b, c, h, w = x.shape
        weight = bias = None
        if self.norm.affine:
            weight, bias = (p.to(self.mean.dtype).repeat(b) for p in (self.norm.weight, self.norm.bias))
        planes = x.reshape(1, b * c, h, w)
        y = F.batch_norm(planes, self.mean, self.var, weight, bias, training=False, eps=self.norm.eps)
        return y.view(b, c, h, w)


class AddMap(LocalOp):
    """(shortcut(saved) + x) / divisor: a residual connection, reading the saved full map at the chunk's crop."""

    def __init__(self, saved: torch.Tensor, shortcut: nn.Module | None, divisor: float) -> None:
        self.saved, self.shortcut, self.divisor = saved, shortcut, divisor

    def __call__(self, x: torch.Tensor, origin: Origin) -> torch.Tensor:
        (h0, w0), (h, w) = origin, x.shape[-2:]
        residual = fetch(self.saved[..., h0 : h0 + h, w0 : w0 + w], x.device)
        if self.shortcut is not None:
            residual = self.shortcut(residual)
        return torch.add(residual, x).div_(self.divisor)  # in place: one chunk-sized temporary fewer


class Attend(LocalOp):
    """A chunk's queries against the keys and values of the whole map (diffusers' AttnProcessor2_0 after its norm)."""

    def __init__(self, attn: Attention, key: torch.Tensor, value: torch.Tensor) -> None:
        self.attn, self.key, self.value = attn, key, value  # [B, heads, all positions, head dim]

    def __call__(self, x: torch.Tensor, origin: Origin) -> torch.Tensor:
        b, c, h, w = x.shape
        query = _heads(self.attn.to_q(_tokens(x)), self.attn.heads)
        out = F.scaled_dot_product_attention(query, self.key, self.value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, h * w, -1).to(query.dtype)
        out = self.attn.to_out[1](self.attn.to_out[0](out))
        return out.transpose(1, 2).reshape(b, c, h, w)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H·W, C]."""
    return x.reshape(*x.shape[:2], -1).transpose(1, 2)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads · d] → [B, heads, N, d]."""
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


# ---- sync points and residual bookkeeping --------------------------------------------------------------------


@dataclass(frozen=True)
class Save:
    """Keep the current full map as a residual input under `slot`."""

    slot: str


@dataclass(frozen=True)
class AddSaved:
    """(shortcut(saved[slot]) + x) / divisor; the slot is released afterwards."""

    slot: str
    shortcut: nn.Module | None
    divisor: float


@dataclass(frozen=True)
class GroupNorm:
    """Sync point: statistics over the whole map."""

    module: nn.GroupNorm


@dataclass(frozen=True)
class SelfAttention:
    """Sync point: keys and values over the whole map (the input is already normalised)."""

    module: Attention


Op = LocalOp | Save | AddSaved | GroupNorm | SelfAttention


# ---- flattening diffusers' VAE networks ----------------------------------------------------------------------


def encoder_ops(encoder: Encoder) -> list[Op]:
    """diffusers' Encoder.forward as a flat op list."""
    ops: list[Op] = [Conv(encoder.conv_in)]
    for i, block in enumerate(encoder.down_blocks):
        if not isinstance(block, DownEncoderBlock2D):
            raise NotImplementedError(f"tiling supports DownEncoderBlock2D only, not {type(block).__name__}")
        for j, resnet in enumerate(block.resnets):
            ops += _resnet_ops(resnet, f"down{i}.resnet{j}")
        for down in block.downsamplers or ():
            ops += _downsample_ops(down)
    ops += _mid_block_ops(encoder.mid_block)
    ops += [GroupNorm(encoder.conv_norm_out), Pointwise(encoder.conv_act), Conv(encoder.conv_out)]
    return ops


def decoder_ops(decoder: Decoder) -> list[Op]:
    """diffusers' Decoder.forward (group norm, no latent embeddings) as a flat op list."""
    if not isinstance(decoder.conv_norm_out, nn.GroupNorm):
        raise NotImplementedError("tiling supports the group-norm Decoder only (not spatial norm)")
    ops: list[Op] = [Conv(decoder.conv_in), *_mid_block_ops(decoder.mid_block)]
    ops.append(Cast(next(iter(decoder.up_blocks.parameters())).dtype))
    for i, block in enumerate(decoder.up_blocks):
        if not isinstance(block, UpDecoderBlock2D):
            raise NotImplementedError(f"tiling supports UpDecoderBlock2D only, not {type(block).__name__}")
        for j, resnet in enumerate(block.resnets):
            ops += _resnet_ops(resnet, f"up{i}.resnet{j}")
        for up in block.upsamplers or ():
            ops += _upsample_ops(up)
    ops += [GroupNorm(decoder.conv_norm_out), Pointwise(decoder.conv_act), Conv(decoder.conv_out)]
    return ops


def _resnet_ops(resnet: ResnetBlock2D, slot: str) -> list[Op]:
    if not isinstance(resnet, ResnetBlock2D) or resnet.upsample or resnet.downsample or resnet.time_emb_proj:
        raise NotImplementedError(f"tiling supports plain ResnetBlock2D without time embedding: {slot}")
    act = Pointwise(resnet.nonlinearity)
    return [
        Save(slot),
        GroupNorm(resnet.norm1),
        act,
        Conv(resnet.conv1),
        GroupNorm(resnet.norm2),
        act,
        Pointwise(resnet.dropout),
        Conv(resnet.conv2),
        AddSaved(slot, _pointwise_conv(resnet.conv_shortcut), resnet.output_scale_factor),
    ]


def _pointwise_conv(conv: nn.Conv2d | None) -> nn.Conv2d | None:
    if conv is not None and conv.kernel_size != (1, 1):
        raise NotImplementedError("a residual shortcut must be a 1×1 convolution")
    return conv


def _attention_ops(attn: Attention, slot: str) -> list[Op]:
    supported = (
        attn.group_norm is not None
        and attn.spatial_norm is None
        and attn.norm_q is None
        and attn.norm_k is None
        and attn.residual_connection
        and not attn.is_cross_attention
        and hasattr(attn, "to_q")  # not fused into to_qkv
    )
    if not supported:
        raise NotImplementedError(f"tiling supports the VAE's group-norm self-attention only: {slot}")
    return [
        Save(slot),
        GroupNorm(attn.group_norm),
        SelfAttention(attn),
        AddSaved(slot, None, attn.rescale_output_factor),
    ]


def _mid_block_ops(mid: UNetMidBlock2D) -> list[Op]:
    ops = _resnet_ops(mid.resnets[0], "mid.resnet0")
    for i, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:], strict=True)):
        if attn is not None:
            ops += _attention_ops(attn, f"mid.attention{i}")
        ops += _resnet_ops(resnet, f"mid.resnet{i + 1}")
    return ops


def _downsample_ops(down: Downsample2D) -> list[Op]:
    if not down.use_conv or down.norm is not None:
        raise NotImplementedError("tiling supports convolutional Downsample2D without norm")
    return [Conv(down.conv, (0, 1) if down.padding == 0 else (0, 0))]


def _upsample_ops(up: Upsample2D) -> list[Op]:
    if up.use_conv_transpose or up.norm is not None:
        raise NotImplementedError("tiling supports interpolating Upsample2D without norm")
    ops: list[Op] = [Upsample()] if up.interpolate else []
    if up.use_conv:
        ops.append(Conv(up.conv if up.name == "conv" else up.Conv2d_0))
    return ops


def alignment(ops: Sequence[Op]) -> int:
    """Chunk boundaries (input pixels) must be multiples of this to be whole pixels at every resolution."""
    scale, multiple = Fraction(1), 1
    for op in ops:
        if isinstance(op, LocalOp):
            scale *= op.scale()
            multiple = lcm(multiple, scale.denominator)
    return multiple


# ---- the chunk grid ------------------------------------------------------------------------------------------


def _split(length: int, tile: int, multiple: int) -> tuple[int, ...]:
    """Boundaries of about equal parts of at most `tile` (rounded down to `multiple`), on multiples of `multiple`."""
    tile = max(tile // multiple, 1) * multiple
    parts = -(-length // tile)
    units = -(-length // multiple)
    return tuple(min(length, multiple * (i * units // parts)) for i in range(parts + 1))


@dataclass(frozen=True)
class ChunkGrid:
    """Disjoint chunk cores covering the network's input: boundaries along rows and columns, in input pixels."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @classmethod
    def split(cls, height: int, width: int, tile: int, multiple: int = 1) -> ChunkGrid:
        """Cores of at most tile × tile (tile rounded down to `multiple`) with boundaries on multiples of `multiple`."""
        return cls(_split(height, tile, multiple), _split(width, tile, multiple))

    def __len__(self) -> int:
        return (len(self.rows) - 1) * (len(self.cols) - 1)

    def cores(self, scale: Fraction, size: tuple[int, int]) -> list[Region]:
        """The cores on a map at `scale` × the input's resolution, `size` pixels (the last boundary is the size)."""
        rows, cols = _scaled(self.rows, scale, size[0]), _scaled(self.cols, scale, size[1])
        return [(r, c) for r in pairwise(rows) for c in pairwise(cols) if r[0] < r[1] and c[0] < c[1]]


def _scaled(bounds: tuple[int, ...], scale: Fraction, size: int) -> list[int]:
    inner = [b * scale for b in bounds[1:-1]]
    if any(b.denominator != 1 for b in inner):
        raise ValueError(f"chunk boundaries {bounds} are not whole pixels at scale {scale}")
    return [0, *(min(int(b), size) for b in inner), size]


# ---- execution -----------------------------------------------------------------------------------------------


def run_tiled(
    ops: Sequence[Op], x: torch.Tensor, grid: ChunkGrid, map_device: torch.device | None = None
) -> torch.Tensor:
    """The flattened network on x, chunk by chunk; equals running it on the whole of x up to float rounding.

    Chunks run on x's device; the full-size maps between sync points live on `map_device` (default: x's device).
    Host maps for a CUDA run are pinned and filled by asynchronous copies (see `_Executor`).
    """
    return _Executor(grid, x.device, map_device or x.device).run(ops, x)


def _host_maps_for(compute: torch.device, storage: torch.device) -> bool:
    return compute.type == "cuda" and storage.type == "cpu"


def fetch(piece: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A crop of a full map on the compute device. From a pinned host map the crop (strided) is gathered into a
    pinned buffer and copied without blocking the host; the caching host allocator keeps that buffer until the
    copy has run. Host maps are only read once their writes have landed (`_Executor._flush` waits for them)."""
    if not _host_maps_for(device, piece.device):
        return piece.to(device)
    staged = torch.empty(piece.shape, dtype=piece.dtype, pin_memory=True)
    staged.copy_(piece)
    return staged.to(device, non_blocking=True)


class _Executor:
    """Runs the ops segment by segment. With host maps for a CUDA run, each chunk's output goes to a pinned map by
    an asynchronous copy (the GPU goes on with the next chunk meanwhile) and the host waits once per segment, for
    its last copy, before anything reads the map: one wait per sync point instead of one per chunk and copy."""

    def __init__(self, grid: ChunkGrid, compute: torch.device, storage: torch.device) -> None:
        self.grid, self.compute, self.storage = grid, compute, storage
        self.host_maps = _host_maps_for(compute, storage)
        self.current = torch.empty(0)
        self.scale = Fraction(1)
        self.pending: list[LocalOp] = []  # the segment since the last sync point, run at the next one
        self.saved: dict[str, tuple[torch.Tensor, Fraction]] = {}

    def run(self, ops: Sequence[Op], x: torch.Tensor) -> torch.Tensor:
        self.current, self.scale = self._new_map(x.shape, x.dtype), Fraction(1)
        self.current.copy_(x)
        for op in ops:
            if isinstance(op, LocalOp):
                self.pending.append(op)
            elif isinstance(op, Save):
                self._flush()
                self.saved[op.slot] = (self.current, self.scale)
            elif isinstance(op, AddSaved):
                saved, scale = self.saved.pop(op.slot)
                if scale != self._pending_scale():
                    raise ValueError(f"residual {op.slot} is at scale {scale}, its addition at {self._pending_scale()}")
                self.pending.append(AddMap(saved, op.shortcut, op.divisor))
            elif isinstance(op, GroupNorm):
                self._flush()
                self.pending.append(self._normalize(op.module))
            else:
                self.pending.append(self._attend(op.module))
        self._flush()
        return fetch(self.current, self.compute)

    def _new_map(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype, device=self.storage, pin_memory=self.host_maps)

    def _pending_scale(self) -> Fraction:
        scale = self.scale
        for op in self.pending:
            scale *= op.scale()
        return scale

    def _flush(self) -> None:
        """Run the pending segment chunk by chunk into the next full map."""
        if not self.pending:
            return
        out: torch.Tensor | None = None
        for (rows, cols), y in self._run_segment():
            if out is None:
                out = self._new_map((*y.shape[:-2], *self._sizes()[-1]), y.dtype)
            out[..., rows[0] : rows[1], cols[0] : cols[1]].copy_(y, non_blocking=self.host_maps)
        assert out is not None
        if self.host_maps:
            torch.cuda.current_stream(self.compute).synchronize()  # the map's copies have landed: the host may read it
        self.current, self.scale, self.pending = out, self._pending_scale(), []

    def _sizes(self) -> list[tuple[int, int]]:
        """Full map size at each pending op's input, and at the segment's output (last)."""
        h, w = self.current.shape[-2:]
        sizes = [(h, w)]
        for op in self.pending:
            h, w = op.out_size(h), op.out_size(w)
            sizes.append((h, w))
        for op, size in zip(self.pending, sizes[:-1], strict=True):
            if isinstance(op, AddMap) and tuple(op.saved.shape[-2:]) != size:
                raise ValueError(f"residual of size {tuple(op.saved.shape[-2:])} added to a map of size {size}")
        return sizes

    def _run_segment(self) -> Iterator[tuple[Region, torch.Tensor]]:
        """Each chunk core of the pending segment's output, computed from its core plus halo of the current map."""
        sizes = self._sizes()
        for core in self.grid.cores(self._pending_scale(), sizes[-1]):
            yield core, self._run_chunk(core, sizes)

    def _run_chunk(self, core: Region, sizes: list[tuple[int, int]]) -> torch.Tensor:
        rows = _needed(self.pending, core[0], [s[0] for s in sizes])
        cols = _needed(self.pending, core[1], [s[1] for s in sizes])
        (h0, h1), (w0, w1) = rows[0], cols[0]
        x, origin = fetch(self.current[..., h0:h1, w0:w1], self.compute), (h0, w0)
        for i, op in enumerate(self.pending):
            if op.scale() < 1:  # a strided op needs its crop to start on its stride grid; others take any margin
                x, origin = _crop(x, origin, (rows[i], cols[i]))
            x = op(x, origin)
            origin = (op.out_start(origin[0]), op.out_start(origin[1]))
        return _crop(x, origin, core)[0]

    def _normalize(self, norm: nn.GroupNorm) -> Normalize:
        """Per-chunk (count, mean, M2) merged with Chan's formula: the whole map's mean and biased variance."""
        moments = [self._moments(rows, cols, norm.num_groups) for rows, cols in self._cores()]
        total = sum(count for count, _, _ in moments)
        mean = torch.zeros_like(moments[0][1])
        for count, chunk_mean, _ in moments:
            mean = mean + chunk_mean * (count / total)
        m2 = torch.zeros_like(mean)
        for count, chunk_mean, chunk_m2 in moments:
            m2 = m2 + chunk_m2 + (chunk_mean - mean).square() * count
        return Normalize(norm, mean, m2 / total)

    def _cores(self) -> list[Region]:
        return self.grid.cores(self.scale, (self.current.shape[-2], self.current.shape[-1]))

    def _moments(self, rows: Interval, cols: Interval, groups: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(count, mean, M2) per (sample, group) of one chunk core, in float32 (float64 for float64 maps)."""
        core = self.current[..., rows[0] : rows[1], cols[0] : cols[1]]
        core = fetch(core, self.compute).to(torch.promote_types(core.dtype, torch.float32))
        var, mean = torch.var_mean(core, dim=(2, 3), correction=0)  # per channel: no reshaped copy of the core
        # the channels of a group have equal counts: merge them with the same formula
        plane = core.shape[-2] * core.shape[-1]
        mean, m2 = mean.unflatten(1, (groups, -1)), (var * plane).unflatten(1, (groups, -1))
        group_mean = mean.mean(-1)
        group_m2 = m2.sum(-1) + (mean - group_mean[..., None]).square().sum(-1) * plane
        return plane * mean.shape[-1], group_mean, group_m2

    def _attend(self, attn: Attention) -> Attend:
        """Keys and values of every position (the pending segment normalises), for the chunks' queries to attend."""
        keys, values = [], []
        for _, y in self._run_segment():
            tokens = _tokens(y)
            keys.append(_heads(attn.to_k(tokens), attn.heads))
            values.append(_heads(attn.to_v(tokens), attn.heads))
        return Attend(attn, torch.cat(keys, dim=2), torch.cat(values, dim=2))


def _needed(segment: Sequence[LocalOp], out: Interval, sizes: list[int]) -> list[Interval]:
    """Along one axis: the interval of each op's input (and, last, of the output) that `out` depends on."""
    needs = [out]
    for op, size in zip(reversed(segment), reversed(sizes[:-1]), strict=True):
        needs.append(op.needed(needs[-1], size))
    return needs[::-1]


def _crop(x: torch.Tensor, origin: Origin, region: Region) -> tuple[torch.Tensor, Origin]:
    """The part of a chunk's crop (first pixel at map coordinates `origin`) that covers `region`."""
    (h0, h1), (w0, w1) = region
    top, left, bottom, right = h0 - origin[0], w0 - origin[1], h1 - origin[0], w1 - origin[1]
    if top < 0 or left < 0 or bottom > x.shape[-2] or right > x.shape[-1]:
        raise AssertionError(f"a chunk crop at {origin} of {tuple(x.shape[-2:])} does not cover {region}")
    return x[..., top:bottom, left:right], (h0, w0)
