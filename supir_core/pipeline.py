"""RestorationPipeline: one photo in, one restored photo out, with SUPIR's recipe (spec §3–4)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from .checkpoints import ModelOptions, load_supir
from .colorfix import color_fix
from .denoiser import Conditioning, Denoiser
from .errors import Canceled, InvalidInput
from .imageio import LoadedImage, finish, load_image, plan_sizes, to_model_input, to_pil
from .models.supir import SupirModel
from .params import MAX_SEED, RestoreParams
from .sampling import (
    RestoreSettings,
    linear_cfg,
    noise_from,
    restore_dpmpp_2m,
    restore_edm,
    restore_edm_tiled,
    tiled_cfg,
)
from .schedules import dpmpp_sigmas, sampling_sigmas
from .tiling import Window, tile_windows


@dataclass(frozen=True)
class Progress:
    stage: str  # "stage1" | "caption" | "conditioning" | "sampling" | "decoding"
    step: int = 0
    steps: int = 0


class Captioner(Protocol):
    def __call__(self, image: Image.Image) -> str: ...


@dataclass
class RestorationResult:
    image: Image.Image  # the input's size × upscale, and its kind (grayscale, alpha)
    stage1: Image.Image  # the robust encoder's reconstruction at the processing size
    metadata: dict[str, Any] = field(default_factory=dict)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    # bf16 where the hardware has it; CPUs without bf16 units are far faster in fp32
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class RestorationPipeline:
    """Loaded once, called per image. `__call__` is the recipe, in numbered steps."""

    def __init__(self, model: SupirModel, captioner: Captioner | None = None) -> None:
        self.model = model
        self.captioner = captioner
        self.denoiser = Denoiser(model.eps)
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoints(
        cls,
        sdxl: str | Path,
        supir: str | Path,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        options: ModelOptions | None = None,
        captioner: Captioner | None = None,
    ) -> RestorationPipeline:
        device = device or default_device()
        dtype = dtype or default_dtype(device)
        model = load_supir(sdxl, supir, device=device, dtype=dtype, options=options or ModelOptions())
        if dtype == torch.float16:
            model.vae.to(torch.bfloat16)  # the SDXL VAE overflows in fp16
        return cls(model, captioner)

    def __call__(
        self,
        image: LoadedImage | Image.Image | str | Path | bytes,
        params: RestoreParams,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        tile_captions: Mapping[Window, str] | None = None,
    ) -> RestorationResult:
        report = on_progress or (lambda p: None)
        timings: dict[str, float] = {}
        model, vae = self.model, self.model.vae

        def check_stop(stage: str) -> None:
            if should_stop is not None and should_stop():
                raise Canceled(f"canceled before {stage}")

        with torch.inference_mode():
            # 1. Input: decode the file, plan sizes (output = upscale × input; processing ≥ min_size, /64)
            loaded = _as_loaded(image)
            sizes = plan_sizes(loaded.size, params.upscale, params.min_size)
            lq = to_model_input(loaded.rgb, sizes.process).to(self.device)
            vae_tile = params.vae_tile_size if max(sizes.process) > params.vae_tile_size else None
            seed = params.seed if params.seed is not None else random.randint(0, MAX_SEED)
            generator = torch.Generator(self.device).manual_seed(seed)

            # 2. Stage 1: the robust encoder's latent steers the adaptor; its decoding is the colour reference
            report(Progress("stage1"))
            with _timed(timings, "stage1", self.device):
                lq_latent = vae.encode_lq(lq, tile=vae_tile)
                x_stage1 = vae.decode(lq_latent, tile=vae_tile)
            stage1_image = to_pil(x_stage1, sizes.process)

            # 3. Prompt: the user's text, else a caption of the stage-1 image, before the quality prompt
            check_stop("captioning")
            caption = params.prompt
            if not caption and self.captioner is not None:
                report(Progress("caption"))
                with _timed(timings, "caption", self.device):
                    caption = self.captioner(stage1_image)
            positive = caption + params.positive_prompt  # no separator, as the official code joins them

            # 4. Text conditioning for both sides of CFG; the LQ latent is the control of both
            report(Progress("conditioning"))
            with _timed(timings, "conditioning", self.device):
                c, uc = model.text([positive]), model.text([params.negative_prompt])
                cond = Conditioning(c.crossattn, c.vector, lq_latent)
                uncond = Conditioning(uc.crossattn, uc.vector, lq_latent)
                tile_conds = self._tile_conditions(tile_captions, params, lq_latent)

            # 5. Guidance anchor: a posterior sample of the stage-1 image under the plain SDXL encoder
            posterior_noise = torch.randn(lq_latent.shape, generator=generator, device=self.device)
            with _timed(timings, "stage1", self.device):
                x_center = vae.encode(x_stage1, noise=posterior_noise, tile=vae_tile)

            # 6. Sample from noise, tiled when the latent is larger than one tile
            check_stop("sampling")
            noise = torch.randn(lq_latent.shape, generator=generator, device=self.device)

            def on_step(info: dict[str, Any]) -> None:
                report(Progress("sampling", info["i"] + 1, info["steps"]))

            with _timed(timings, "sampling", self.device):
                sampled, tiled = self._sample(
                    params, noise, cond, uncond, tile_conds, x_center, noise_from(generator), on_step, should_stop
                )

            # 7. Decode and pull the colours back to the stage-1 image
            report(Progress("decoding"))
            with _timed(timings, "decoding", self.device):
                decoded = vae.decode(sampled, tile=vae_tile)
                restored = color_fix(decoded, x_stage1, params.color_fix)

            # 8. Back to the input's size and kind
            output = finish(to_pil(restored, sizes.output), loaded)

        metadata = {
            "seed": seed,
            "caption": caption,
            "positive_prompt": positive,
            "negative_prompt": params.negative_prompt,
            "input_size": list(sizes.input),
            "process_size": list(sizes.process),
            "output_size": list(sizes.output),
            "sampler": params.sampler,
            "steps": params.steps,
            "tiled_sampling": tiled,
            "tiled_vae": vae_tile is not None,
            "seconds": {k: round(v, 4) for k, v in timings.items()},
            "device": str(self.device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        }
        return RestorationResult(output, stage1_image, metadata)

    def _tile_conditions(
        self, tile_captions: Mapping[Window, str] | None, params: RestoreParams, lq_latent: torch.Tensor
    ) -> dict[Window, Conditioning] | None:
        if not tile_captions:
            return None
        conds = {}
        for window, text in tile_captions.items():
            t = self.model.text([text + params.positive_prompt])
            conds[window] = Conditioning(t.crossattn, t.vector, lq_latent)
        return conds

    def _sample(
        self,
        params: RestoreParams,
        noise: torch.Tensor,
        cond: Conditioning,
        uncond: Conditioning,
        tile_conds: dict[Window, Conditioning] | None,
        x_center: torch.Tensor,
        step_noise: Callable[[int, torch.Tensor], torch.Tensor],
        on_step: Callable[[dict[str, Any]], None],
        should_stop: Callable[[], bool] | None,
    ) -> tuple[torch.Tensor, bool]:
        settings = RestoreSettings(
            s_churn=params.s_churn,
            s_noise=params.s_noise,
            restore_cfg=params.restoration_scale,
            control_scale=params.control_scale,
            control_scale_start=params.control_scale_start,
            use_linear_control_scale=params.linear_control_scale,
        )
        cfg_start = params.cfg_scale_start if params.linear_cfg else params.cfg_scale
        common: dict[str, Any] = {
            "settings": settings,
            "sigma_max": self.denoiser.sigma_max,
            "x_center": x_center,
            "callback": on_step,
            "should_stop": should_stop,
        }
        if params.sampler == "dpmpp_2m":
            guided = linear_cfg(self.denoiser, cond, uncond, cfg_start, params.cfg_scale)
            sigmas = dpmpp_sigmas(params.steps, self.denoiser.train_sigmas)
            out = restore_dpmpp_2m(
                guided, noise, sigmas, step_noise=step_noise, full_guidance=params.dpmpp_full_guidance, **common
            )
            return out, False
        sigmas = sampling_sigmas(params.steps, self.denoiser.train_sigmas)
        height, width = noise.shape[-2:]
        if max(height, width) <= params.tile_size:
            guided = linear_cfg(self.denoiser, cond, uncond, cfg_start, params.cfg_scale)
            return restore_edm(guided, noise, sigmas, churn_noise=step_noise, **common), False
        tile = min(params.tile_size, height, width)
        stride = min(params.tile_stride, tile)
        per_tile = tiled_cfg(self.denoiser, tile_conds or cond, uncond, cfg_start, params.cfg_scale)
        out = restore_edm_tiled(
            per_tile,
            noise,
            sigmas,
            tile=tile,
            stride=stride,
            churn_noise=step_noise,
            tiles_per_batch=params.tiles_per_batch,
            centered_weights=params.centered_tile_weights,
            **common,
        )
        return out, True

    def windows(self, image_size: tuple[int, int], params: RestoreParams) -> list[Window]:
        """The sampler tiles (latent pixels) an image of this size will use; [] when it is not tiled."""
        sizes = plan_sizes(image_size, params.upscale, params.min_size)
        width, height = sizes.process[0] // 8, sizes.process[1] // 8
        if max(height, width) <= params.tile_size or params.sampler != "edm":
            return []
        tile = min(params.tile_size, height, width)
        return tile_windows(height, width, tile, min(params.tile_stride, tile))


def _as_loaded(image: LoadedImage | Image.Image | str | Path | bytes) -> LoadedImage:
    if isinstance(image, LoadedImage):
        return image
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L", "RGBA", "LA"):
            raise InvalidInput(f"image mode {image.mode} is not supported in memory: pass the file instead")
        rgba = image.mode in ("RGBA", "LA")
        return LoadedImage(
            rgb=image.convert("RGB"),
            alpha=image.getchannel("A") if rgba else None,
            grayscale=image.mode in ("L", "LA"),
            source_mode=image.mode,
        )
    return load_image(image)


@contextmanager
def _timed(timings: dict[str, float], stage: str, device: torch.device) -> Iterator[None]:
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
