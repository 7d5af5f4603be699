"""The arithmetic of a run's plan, torch-free: its sizes (spec §4.1) and which of its parts tile (supir_core.memory
traces the bytes, the pipeline holds them to the budget). The API imports this to estimate a job before it runs;
the pipeline imports it to run one, so both answer the same."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .params import RestoreParams

SIZE_MULTIPLE = 64  # processing sides are rounded to this (latent /8, UNet /4 more, and the adaptor likewise)
GB = 1e9


@dataclass(frozen=True)
class Sizes:
    """Input, processing and output sizes, (width, height)."""

    input: tuple[int, int]
    process: tuple[int, int]
    output: tuple[int, int]


def plan_sizes(size: tuple[int, int], upscale: float, min_size: int) -> Sizes:
    """Output = upscale × input; processing size = that, raised to a min_size short side, sides rounded to 64."""
    w, h = size
    out_w, out_h = max(round(w * upscale), 1), max(round(h * upscale), 1)
    scale = max(1.0, min_size / min(out_w, out_h))
    proc_w = max(SIZE_MULTIPLE, round(out_w * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    proc_h = max(SIZE_MULTIPLE, round(out_h * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    return Sizes(input=(w, h), process=(proc_w, proc_h), output=(out_w, out_h))


def plan_caption_sizes(size: tuple[int, int], upscale: float, short_side: int = 512) -> Sizes:
    """The official caption input: the upscaled input's shape at a `short_side` short side; processed with sides
    rounded to 64 (`process`), handed to the captioner at the unrounded size (`output`)."""
    w, h = size[0] * upscale, size[1] * upscale
    scale = short_side / min(w, h)
    out_w, out_h = round(w * scale), round(h * scale)
    proc_w = max(SIZE_MULTIPLE, round(w * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    proc_h = max(SIZE_MULTIPLE, round(h * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    return Sizes(input=size, process=(proc_w, proc_h), output=(out_w, out_h))


@dataclass(frozen=True)
class StageBytes:
    """Activation bytes per image pixel (processing size, one image) of each stage, run untiled."""

    stage1: float  # robust encode, decode, encode of the stage-1 image
    sampling: float  # one guided network call (adaptor + UNet, CFG batch of 2)
    decode: float
    vae_maps: float = 0.0  # what a tiled VAE pass's full-size maps and output add per pixel, the maps on the device

    def at(self, pixels: int, batch: int = 1) -> dict[str, float]:
        """Planned bytes of each stage for `batch` samples of one image of `pixels` pixels: stage 1 runs once per
        image (the samples share it), sampling (CFG batch 2·batch) and decoding run on every sample at once."""
        scale = pixels * batch
        return {"stage1": self.stage1 * pixels, "sampling": self.sampling * scale, "decode": self.decode * scale}


@dataclass(frozen=True)
class Budget:
    """Bytes of activations a run may use, where the figure comes from, and what it was computed from (GB).

    It depends only on the device, the loaded models and the settings, never on what other processes hold at the
    moment: the same job on the same deployment takes the same path (and gives the same bytes) every time."""

    bytes: float
    source: str
    inputs: dict[str, float] | None = None  # total_gb, models_gb, margin_gb (None: set by hand)


@dataclass(frozen=True)
class TilingDecision:
    """Which parts of a run are tiled, and why (reported in the job's metadata)."""

    policy: str  # what was asked (params.tiling): auto, always or never
    sampling: bool
    vae: bool
    reason: str
    planned_gb: dict[str, float] | None = None  # untiled activations per stage
    budget_gb: float | None = None
    budget_inputs: dict[str, float] | None = None  # what the budget was computed from

    def metadata(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "sampling": "tiled" if self.sampling else "untiled",
            "vae": "tiled" if self.vae else "untiled",
            "reason": self.reason,
            "planned_gb": self.planned_gb,
            "budget_gb": self.budget_gb,
            "budget_inputs": self.budget_inputs,
        }


def decide_tiling(
    policy: str,
    *,
    sampler_can_tile: bool,
    vae_can_tile: bool,
    plan: Callable[[], tuple[dict[str, float], Budget]],
) -> TilingDecision:
    """always/never as asked; auto: tile a part only when its planned untiled activations exceed the budget.

    `plan()` gives (bytes per stage, the budget); it is called only when some part could be tiled at all.
    """
    if policy == "never" or not (sampler_can_tile or vae_can_tile):
        reason = "tiling=never" if policy == "never" else "the image fits in one tile"
        return TilingDecision(policy, False, False, reason)
    if policy == "always":
        return TilingDecision(policy, sampler_can_tile, vae_can_tile, "tiling=always")
    planned, budget = plan()
    vae_bytes = max(planned["stage1"], planned["decode"])
    sampling = sampler_can_tile and planned["sampling"] > budget.bytes
    vae = vae_can_tile and vae_bytes > budget.bytes
    worst = max(planned, key=lambda k: planned[k])
    verdict = "exceeds" if sampling or vae else "fits in"
    reason = (
        f"planned {planned[worst] / GB:.2f} GB of activations ({worst}) {verdict} {budget.bytes / GB:.2f} GB "
        f"({budget.source})"
    )
    gb = {k: round(v / GB, 4) for k, v in planned.items()}
    return TilingDecision(policy, sampling, vae, reason, gb, round(budget.bytes / GB, 4), budget.inputs)


def plan_tiling(
    params: RestoreParams,
    image_hw: tuple[int, int],
    plan: Callable[[], tuple[dict[str, float], Budget]],
) -> TilingDecision:
    """Which parts of a run on an image of this processing size (pixels, height × width) are tiled, per
    `params.tiling`; `plan()` (bytes per stage, the budget) is called only when some part could be tiled."""
    latent_hw = (image_hw[0] // 8, image_hw[1] // 8)
    return decide_tiling(
        params.tiling,
        sampler_can_tile=params.sampler == "edm" and max(latent_hw) > params.tile_size,  # DPM++: never tiled
        vae_can_tile=max(image_hw) > params.vae_tile_size,
        plan=plan,
    )
