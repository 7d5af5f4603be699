"""RestorationPipeline: one photo in, one restored photo out, with SUPIR's recipe (spec §3–4)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .captioning import Captioner, compose_prompt
from .checkpoints import ModelOptions, load_supir
from .colorfix import color_fix
from .denoiser import Conditioning, Denoiser
from .errors import Canceled, InvalidInput
from .faces import (
    FACE_HINT,
    FaceDetector,
    FacePass,
    FaceRegion,
    HaarFaceDetector,
    blend_face,
    face_seed,
    plan_regions,
    restored_side,
)
from .guidance import RestoreSettings, TileBatch, sample
from .imageio import (
    LoadedImage,
    Sizes,
    finish,
    load_image,
    plan_caption_sizes,
    plan_sizes,
    to_model_input,
    to_pil,
)
from .memory import (
    Budget,
    StageBytes,
    TilingDecision,
    graph_pool_bytes,
    memory_budget,
    module_bytes,
    trace_stage_bytes,
)
from .models.supir import SupirModel
from .params import MAX_SEED, RestoreParams, sample_seeds, validate_params
from .plan import plan_tiling
from .prompts import PromptEmbeddings
from .sampling import NoiseFn, noise_from
from .speed import SpeedSettings, optimize
from .tiling import Window, tile_windows
from .variants import numerics_identity


@dataclass(frozen=True)
class Progress:
    stage: str  # "stage1" | "caption" | "conditioning" | "sampling" | "decoding" | "faces"
    step: int = 0
    steps: int = 0


# (x_stage1, whether every tile has its own caption) → ((c_crossattn, c_vector), (uc_crossattn, uc_vector))
PromptEncoder = Callable[
    [torch.Tensor, bool], tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
]


@dataclass
class PipelineNoise:
    """Every random draw of a run, in the official order: posterior sample, initial noise, per-step noise."""

    posterior: Callable[[tuple[int, ...]], torch.Tensor]  # shape → N(0, I)
    initial: Callable[[tuple[int, ...]], torch.Tensor]
    step: NoiseFn

    @classmethod
    def seeded(cls, seed: int | Sequence[int], device: torch.device) -> PipelineNoise:
        """One generator per sample (row of the batch): sample i draws its rows from seeds[i] in a single run's
        order, so it is the single run with that seed whatever the batch."""
        seeds = [seed] if isinstance(seed, int) else list(seed)
        generators = [torch.Generator(device).manual_seed(s) for s in seeds]

        def draw(shape: tuple[int, ...]) -> torch.Tensor:
            if shape[0] != len(generators):
                raise ValueError(f"{len(generators)} seed(s) for a draw of {shape[0]} samples: one seed per sample")
            rows = [torch.randn((1, *shape[1:]), generator=g, device=device) for g in generators]
            return rows[0] if len(rows) == 1 else torch.cat(rows)

        return cls(draw, draw, lambda i, like: draw(like.shape).to(like))

    @classmethod
    def recorded(cls, posterior: torch.Tensor, initial: torch.Tensor, steps: torch.Tensor | None) -> PipelineNoise:
        return cls(lambda shape: posterior, lambda shape: initial, noise_from(steps))


@dataclass
class Stages:
    """The tensors of one run (scaled latents; images in about [−1, 1]). Stage 1 is one image; x_center and what
    follows hold every sample."""

    lq_latent: torch.Tensor
    x_stage1: torch.Tensor
    x_center: torch.Tensor
    sampled_latent: torch.Tensor
    decoded: torch.Tensor
    restored: torch.Tensor
    tiling: TilingDecision
    tile_captions: dict[Window, str] = field(default_factory=dict)


@dataclass
class Stage1:
    """Stage 1's products at the processing size: the robust encoder's latent (the adaptor's control) and its
    decoding (the colour reference and the guidance anchor's source). A preview keeps them, so that a later run
    with an edited prompt skips stage 1 and, with the same seed, gives exactly what a single run would."""

    lq_latent: torch.Tensor
    x_stage1: torch.Tensor

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        tensors = {"lq_latent": self.lq_latent, "x_stage1": self.x_stage1}
        return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})

    @classmethod
    def from_bytes(cls, data: bytes) -> Stage1:
        from safetensors.torch import load

        try:
            tensors = load(data)
            return cls(tensors["lq_latent"], tensors["x_stage1"])
        except Exception as exc:  # truncated or foreign bytes: the caller's input, not our bug
            raise InvalidInput(f"the stored stage-1 result is unreadable ({type(exc).__name__})") from exc


@dataclass(frozen=True)
class Prompts:
    """The text a run was conditioned on."""

    caption: str  # the captioner's ("" without one, or when every sampler tile has a caption of its own)
    positive: str  # caption and user prompt, then the quality prompt, as encoded
    negative: str


@dataclass
class Preview:
    """Stage 1 and its caption, without sampling: what the official demo shows before stage 2."""

    stage1_image: Image.Image  # at the processing size
    caption: str
    stage1: Stage1
    sizes: Sizes  # input, processing and output (width, height)
    seconds: dict[str, float]  # stage → seconds: stage1, caption


@dataclass
class RestorationResult:
    """One restored photo, every sample of it, and how it was made."""

    images: list[Image.Image]  # every sample, the input's size × upscale and its kind (grayscale, alpha); seeds' order
    stage1: Image.Image  # the robust encoder's reconstruction at the processing size
    seeds: list[int]  # one per sample; the first is the run's seed
    prompts: Prompts
    sizes: Sizes  # input, processing and output (width, height)
    sampler: str
    steps: int
    tiling: TilingDecision  # asked policy, which parts ran tiled, and why
    tile_captions: dict[Window, str]  # each sampler tile's own caption (latent window → text); empty when none
    seconds: dict[str, float]  # stage → seconds: stage1, caption, conditioning, encode, sampling, decoding
    device: str
    dtype: str
    faces: FacePass | None = None  # faces=auto: what the face pass found and restored

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def seed(self) -> int:
        return self.seeds[0]

    def to_dict(self) -> dict[str, Any]:
        """Everything but the images as JSON values (the CLI's --metadata file)."""
        return {
            "seed": self.seed,
            "seeds": self.seeds,
            "caption": self.prompts.caption,
            "positive_prompt": self.prompts.positive,
            "negative_prompt": self.prompts.negative,
            "input_size": list(self.sizes.input),
            "process_size": list(self.sizes.process),
            "output_size": list(self.sizes.output),
            "sampler": self.sampler,
            "steps": self.steps,
            "tiled_sampling": self.tiling.sampling,
            "tiled_vae": self.tiling.vae,
            "tiling": self.tiling.metadata(),
            "tile_captions": [{"window": list(w), "caption": c} for w, c in self.tile_captions.items()],
            "seconds": self.seconds,
            "device": self.device,
            "dtype": self.dtype,
            "faces": self.faces.metadata() if self.faces is not None else None,
        }


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    # bf16 where the hardware has it; CPUs without bf16 units are far faster in fp32
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class RestorationPipeline:
    """Loaded once, called per image. `__call__` is the recipe, in numbered steps."""

    def __init__(
        self, model: SupirModel, captioner: Captioner | None = None, speed: SpeedSettings | None = None
    ) -> None:
        self.model = model
        self.captioner = captioner
        self.denoiser = Denoiser(model.eps)
        self.device = next(model.unet.parameters()).device
        speed = speed or SpeedSettings()
        self.prompts = PromptEmbeddings(model.text, self.device, size=speed.prompt_cache, offload=speed.offload_text)
        self.memory_budget_gb = speed.memory_budget_gb
        self.plan_cache_dir = speed.plan_cache_dir
        # the networks' dtype: the first parameter wider than a byte (fp8 weights are the speed setting's part)
        dtype = next(p.dtype for p in model.unet.parameters() if p.dtype.itemsize > 1)
        self.numerics = numerics_identity(self.device.type, str(dtype).removeprefix("torch."), speed.fp8)
        self._stage_bytes: StageBytes | None = None  # traced on the first job that could be tiled
        self._tile_batches: dict[tuple[int, int], TileBatch] = {}  # (tile, rows per tile) → tiles per network call
        self.face_detector: FaceDetector = HaarFaceDetector()  # faces=auto; the cascades load on first use

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
        speed: SpeedSettings | None = None,
    ) -> RestorationPipeline:
        device = device or default_device()
        dtype = dtype or default_dtype(device)
        model = load_supir(sdxl, supir, device=device, dtype=dtype, options=options or ModelOptions())
        if dtype == torch.float16:
            model.vae.to(torch.bfloat16)  # the SDXL VAE overflows in fp16
        if speed is not None:
            optimize(model, speed)
        return cls(model, captioner, speed)

    def __call__(
        self,
        image: LoadedImage | Image.Image | str | Path | bytes,
        params: RestoreParams,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        tile_captions: Mapping[Window, str] | None = None,
        stage1: Stage1 | None = None,
    ) -> RestorationResult:
        """Restore one image file (or decoded image); the recipe on tensors is `restore_tensor`. With `stage1`
        (a preview's), stage 1 is not run again."""
        timings: dict[str, float] = {}
        prompts: list[Prompts] = []  # what the prompt encoder encoded
        with torch.inference_mode():
            # 1. Input: decode the file, plan sizes (output = upscale × input; processing ≥ min_size, /64)
            loaded = _as_loaded(image)
            sizes = plan_sizes(loaded.size, params.upscale, params.min_size)
            lq = to_model_input(loaded.rgb, sizes.process).to(self.device)
            seed = params.seed if params.seed is not None else random.randint(0, MAX_SEED)
            seeds = sample_seeds(seed, params.num_samples)

            # 2. The recipe, with noise from each sample's seed and prompts from the user or the captioner
            stages = self.restore_tensor(
                lq,
                params,
                noise=PipelineNoise.seeded(seeds, self.device),
                encode_prompts=self._prompt_encoder(params, loaded, prompts, timings, on_progress),
                tile_captions=tile_captions,
                on_progress=on_progress,
                should_stop=should_stop,
                timings=timings,
                stage1=_checked(stage1, sizes.process, self.device) if stage1 is not None else None,
            )

            # 3. Back to the input's size, every sample; faces restored again and blended in (faces=auto); the
            #    input's kind (grayscale, alpha) last
            images = [to_pil(s[None], sizes.output, params.quantize) for s in stages.restored]
            faces = None
            if params.faces == "auto":
                _check_stop(should_stop, "faces")
                faces = self._face_pass(loaded, params, seeds, prompts[-1], images, on_progress, should_stop, timings)
            outputs = [finish(image, loaded) for image in images]
            stage1_image = to_pil(stages.x_stage1, sizes.process, params.quantize)

        return RestorationResult(
            images=outputs,
            stage1=stage1_image,
            seeds=seeds,
            prompts=prompts[-1],
            sizes=sizes,
            sampler=params.sampler,
            steps=params.steps,
            tiling=stages.tiling,
            tile_captions=stages.tile_captions,
            seconds=_rounded(timings),
            device=str(self.device),
            dtype=str(next(self.model.parameters()).dtype).removeprefix("torch."),
            faces=faces,
        )

    def _face_pass(
        self,
        loaded: LoadedImage,
        params: RestoreParams,
        seeds: list[int],
        used: Prompts,
        images: list[Image.Image],
        on_progress: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
        timings: dict[str, float],
    ) -> FacePass:
        """Find the faces of the input, restore each small one again (all faces of all samples in one batched run
        where memory allows) and blend it into every sample's image (`images`, replaced in place)."""
        report = on_progress or (lambda p: None)
        side = restored_side(params.face_size)
        found = FacePass(self.face_detector.name, params.face_size, side)
        start = time.perf_counter()
        boxes = self.face_detector(loaded.rgb)
        sizes = plan_sizes(loaded.size, params.upscale, params.min_size)
        found.regions = plan_regions(
            boxes, loaded.size, sizes.output, sizes.process, params.face_size, params.max_faces
        )
        found.seconds["detect"] = time.perf_counter() - start
        todo = [r for r in found.regions if r.restored]
        if todo:
            with _timed(found.seconds, "restore", self.device):
                faces = self._restore_faces(loaded, params, seeds, used, todo, side, report, should_stop)
            start = time.perf_counter()
            for i, image in enumerate(images):
                pixels = np.array(image)
                for j, region in enumerate(todo):
                    blend_face(pixels, faces[i * len(todo) + j][None], region, params.quantize)
                images[i] = Image.fromarray(pixels, mode="RGB")
            found.seconds["blend"] = time.perf_counter() - start
            share = found.seconds["restore"] / len(todo)
            found.face_seconds = [share if r.restored else 0.0 for r in found.regions]
        timings["faces"] = sum(found.seconds.values())
        return found

    def _restore_faces(
        self,
        loaded: LoadedImage,
        params: RestoreParams,
        seeds: list[int],
        used: Prompts,
        regions: list[FaceRegion],
        side: int,
        report: Callable[[Progress], None],
        should_stop: Callable[[], bool] | None,
    ) -> torch.Tensor:
        """Every region of every sample restored at side × side ([samples · faces, 3, side, side], sample-major),
        in as few batched runs as the memory budget allows; a row's result does not depend on its batch."""
        crops = torch.cat([to_model_input(loaded.rgb.crop(r.source), (side, side)) for r in regions])
        lq = crops.repeat(len(seeds), 1, 1, 1).to(self.device)
        row_seeds = [face_seed(seed, j) for seed in seeds for j in range(len(regions))]
        hint = f"{params.prompt.strip()} {FACE_HINT}".strip()
        face_params = params.model_copy(update={"num_samples": 1, "tiling": "never", "prompt": hint})
        positive = self.positive_prompt(used.caption, face_params)

        def encode(x_stage1: torch.Tensor, tiles_captioned: bool) -> tuple[Any, Any]:
            return self.prompts(positive), self.prompts(params.negative_prompt)

        rows = self._face_rows(side, len(row_seeds))
        starts = range(0, len(row_seeds), rows)
        restored = []
        for chunk, first in enumerate(starts):

            def progress(p: Progress, done: int = chunk * params.steps) -> None:
                if p.stage == "sampling":
                    report(Progress("faces", done + p.step, len(starts) * params.steps))

            stages = self.restore_tensor(
                lq[first : first + rows],
                face_params,
                noise=PipelineNoise.seeded(row_seeds[first : first + rows], self.device),
                encode_prompts=encode,
                on_progress=progress,
                should_stop=should_stop,
            )
            restored.append(stages.restored)
        return torch.cat(restored)

    def _face_rows(self, side: int, total: int) -> int:
        """Rows per face run: all of them if the plan fits the budget, else the fewest equal chunks that fit."""
        planned, budget = self._memory_plan(side * side, 1)
        per_row = max(planned.values())
        fit = max(1, min(total, int(budget.bytes // per_row))) if per_row > 0 else total
        chunks = math.ceil(total / fit)
        return math.ceil(total / chunks)

    def restore_tensor(
        self,
        lq: torch.Tensor,
        params: RestoreParams,
        *,
        noise: PipelineNoise,
        encode_prompts: PromptEncoder,
        tile_captions: Mapping[Window, str] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        timings: dict[str, float] | None = None,
        stage1: Stage1 | None = None,
    ) -> Stages:
        """SUPIR's recipe on an LQ image tensor [B, 3, H, W] in [−1, 1], sides multiples of 64 (spec §4.2).

        With params.num_samples > 1 (B = 1), stage 1 and the prompts run once and the sampler runs on num_samples
        rows; `noise` then draws num_samples rows."""
        report = on_progress or (lambda p: None)
        timings = timings if timings is not None else {}
        if params.num_samples > 1 and lq.shape[0] != 1:
            raise ValueError(f"num_samples={params.num_samples} restores one image; got a batch of {lq.shape[0]}")
        batch = lq.shape[0] * params.num_samples  # the rows the sampler and the decoder run on
        tiling = self.plan_tiling(params, (lq.shape[-2], lq.shape[-1]), batch)
        vae_tile = self._prepare_vae(params, tiling, lq.shape[-2] * lq.shape[-1], batch)

        # 1. Stage 1: the robust encoder's latent steers the adaptor; its decoding is the colour reference
        if stage1 is not None:
            lq_latent, x_stage1 = stage1.lq_latent, stage1.x_stage1
        else:
            lq_latent, x_stage1 = self.stage1(lq, vae_tile, timings, report)

        # 2. Conditioning for both sides of CFG (prompt text → CLIP-L + bigG + sizes); control = LQ latent.
        #    Tiled sampling with a captioner captions every tile of the stage-1 image for its own prompt.
        _check_stop(should_stop, "conditioning")
        windows = self.sampler_windows(tuple(lq_latent.shape[-2:]), params) if tiling.sampling else []
        if tile_captions is None and windows and self._captions(params) and params.caption_tiles:
            tile_captions = self._caption_tiles(x_stage1, windows, params, timings, report)
        with self.prompts.on_device():  # offloaded text encoders: one visit for the prompts and every tile's
            cond, uncond = _conditionings(encode_prompts(x_stage1, bool(tile_captions)), lq_latent, batch)
            tile_conds = self._tile_conditions(tile_captions, params, lq_latent, batch)

        # 3. Guidance anchor: a posterior sample of the stage-1 image under the plain SDXL encoder, one per sample
        #    (one encode: the noise's rows broadcast over the posterior's one row)
        latent_shape = (batch, *lq_latent.shape[1:])
        with _timed(timings, "encode", self.device):
            x_center = self.model.vae.encode(x_stage1, noise=noise.posterior(latent_shape), tile=vae_tile)

        # 4. Sample from noise (in tiles if the plan says so), all samples in each network call
        _check_stop(should_stop, "sampling")
        initial = noise.initial(latent_shape)
        with _timed(timings, "sampling", self.device):
            tile_batch = self.tile_batch(params, tuple(initial.shape[-2:]), batch) if tiling.sampling else None
            sampled = self._sample(
                params, initial, cond, uncond, tile_conds, x_center, noise.step, tile_batch, report, should_stop
            )

        # 5. Decode and pull each sample's colours back to the (one) stage-1 image
        report(Progress("decoding"))
        with _timed(timings, "decoding", self.device):
            decoded = self.model.vae.decode(sampled, tile=vae_tile)
            restored = color_fix(decoded, x_stage1, params.color_fix)
        return Stages(lq_latent, x_stage1, x_center, sampled, decoded, restored, tiling, dict(tile_captions or {}))

    def _prepare_vae(self, params: RestoreParams, tiling: TilingDecision, pixels: int, batch: int) -> int | None:
        """The VAE's chunk side for this run (None: untiled). A tiled VAE keeps full-size maps between its layers:
        on the device when they fit beside a chunk's activations, else in (pinned) host memory."""
        host = tiling.vae and self.device.type == "cuda" and not self.vae_maps_fit(params, pixels, batch)
        self.model.vae.map_device = "cpu" if host else None
        return params.vae_tile_size if tiling.vae else None

    def vae_maps_fit(self, params: RestoreParams, pixels: int, batch: int) -> bool:
        """Whether a tiled VAE pass over `pixels` (batch rows) fits on the device with its full-size maps: the maps
        (traced, bytes per pixel) plus one chunk's untiled activations within the memory budget."""
        chunk, budget = self._memory_plan(params.vae_tile_size**2, batch)
        assert self._stage_bytes is not None  # traced by the plan
        maps = self._stage_bytes.vae_maps * pixels * batch
        return maps + max(chunk["stage1"], chunk["decode"]) <= budget.bytes

    def _sample(
        self,
        params: RestoreParams,
        initial: torch.Tensor,
        cond: Conditioning,
        uncond: Conditioning,
        tile_conds: dict[Window, Conditioning] | None,
        x_center: torch.Tensor,
        step_noise: NoiseFn,
        tile_batch: TileBatch | None,
        report: Callable[[Progress], None],
        should_stop: Callable[[], bool] | None,
    ) -> torch.Tensor:
        """The sampler `params` names, from the initial noise to a latent, every step reported; tiled when given
        `tile_batch` (tiles per network call)."""
        return sample(
            RestoreSettings.from_params(params),
            self.denoiser,
            initial,
            cond,
            uncond,
            x_center=x_center,
            step_noise=step_noise,
            tiled=tile_batch is not None,
            tile_conds=tile_conds,
            tile_batch=tile_batch,
            callback=lambda info: report(Progress("sampling", info["i"] + 1, info["steps"])),
            should_stop=should_stop,
        )

    def stage1(
        self,
        lq: torch.Tensor,
        vae_tile: int | None,
        timings: dict[str, float],
        report: Callable[[Progress], None],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(lq_latent, x_stage1): the robust encoder's latent and its decoding."""
        report(Progress("stage1"))
        with _timed(timings, "stage1", self.device):
            lq_latent = self.model.vae.encode_lq(lq, tile=vae_tile)
            return lq_latent, self.model.vae.decode(lq_latent, tile=vae_tile)

    def preview(
        self,
        image: LoadedImage | Image.Image | str | Path | bytes,
        params: RestoreParams,
        *,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> Preview:
        """Stage 1 and the caption of its image (as a full run would caption it), no sampling: the official
        demo's first step, after which a person corrects the caption and runs stage 2 (`stage1=`)."""
        report = on_progress or (lambda p: None)
        timings: dict[str, float] = {}
        with torch.inference_mode():
            loaded = _as_loaded(image)
            sizes = plan_sizes(loaded.size, params.upscale, params.min_size)
            lq = to_model_input(loaded.rgb, sizes.process).to(self.device)
            tiling = self.plan_tiling(params, (lq.shape[-2], lq.shape[-1]), lq.shape[0])
            vae_tile = self._prepare_vae(params, tiling, lq.shape[-2] * lq.shape[-1], lq.shape[0])
            lq_latent, x_stage1 = self.stage1(lq, vae_tile, timings, report)
            caption = ""
            if self._captions(params):
                assert self.captioner is not None
                report(Progress("caption"))
                with _timed(timings, "caption", self.device):
                    caption = self.captioner(self.caption_image(loaded, x_stage1, params), params.caption_question)
            stage1_image = to_pil(x_stage1, sizes.process, params.quantize)
        return Preview(stage1_image, caption, Stage1(lq_latent, x_stage1), sizes, _rounded(timings))

    def _captions(self, params: RestoreParams) -> bool:
        return params.caption == "auto" and self.captioner is not None

    def warm_up(self, size: int, steps: int = 3) -> float:
        """One throwaway restoration of a size² noise image, no caption: compiles the graphs (or loads them from the
        compile cache), picks kernels, grows the allocator and traces the memory plan, so the first real job runs at
        full speed. Seconds."""
        start = time.perf_counter()
        if self._stage_bytes is None:
            # the memory plan of tiling=auto, ready for jobs
            self._stage_bytes = trace_stage_bytes(self.model, cache_dir=self.plan_cache_dir)
        noise = Image.effect_noise((size, size), 48).convert("RGB")
        self(noise, validate_params({"min_size": size, "steps": steps, "seed": 0, "caption": "none"}))
        return time.perf_counter() - start

    def positive_prompt(self, caption: str, params: RestoreParams) -> str:
        """Caption and/or user prompt, then the quality prompt (spec §3.7), composed as params.prompt_style says."""
        count = self.model.text.tokenizer.count
        return compose_prompt(caption, params.prompt, params.positive_prompt, params.prompt_style, count)

    def _prompt_encoder(
        self,
        params: RestoreParams,
        loaded: LoadedImage,
        record: list[Prompts],
        timings: dict[str, float],
        on_progress: Callable[[Progress], None] | None,
    ) -> PromptEncoder:
        """The caption of a stage-1 image (unless every tile has its own) with the user's text; appended to
        `record`."""

        def encode(
            x_stage1: torch.Tensor, tiles_captioned: bool
        ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
            caption = ""
            if self._captions(params) and not tiles_captioned:
                assert self.captioner is not None
                if on_progress is not None:
                    on_progress(Progress("caption"))
                with _timed(timings, "caption", self.device):
                    caption = self.captioner(self.caption_image(loaded, x_stage1, params), params.caption_question)
            positive = self.positive_prompt(caption, params)
            record.append(Prompts(caption, positive, params.negative_prompt))
            if on_progress is not None:
                on_progress(Progress("conditioning"))
            with _timed(timings, "conditioning", self.device):
                return self.prompts(positive), self.prompts(params.negative_prompt)

        return encode

    def caption_image(self, loaded: LoadedImage, x_stage1: torch.Tensor, params: RestoreParams) -> Image.Image:
        """What the captioner sees. official: the input resized to a 512-px short side (sides rounded to 64) through
        the robust encoder and the decoder, as test.py and the demo caption; full: the run's stage-1 image."""
        if params.caption_input == "full":
            return to_pil(x_stage1, (x_stage1.shape[-1], x_stage1.shape[-2]))
        sizes = plan_caption_sizes(loaded.size, params.upscale)
        small = to_model_input(loaded.rgb, sizes.process).to(self.device)
        return to_pil(self.model.vae.decode(self.model.vae.encode_lq(small)), sizes.output)

    def _caption_tiles(
        self,
        x_stage1: torch.Tensor,
        windows: list[Window],
        params: RestoreParams,
        timings: dict[str, float],
        report: Callable[[Progress], None],
    ) -> dict[Window, str]:
        """A caption of each sampler tile's part of the stage-1 image (latent windows × 8 in pixels)."""
        assert self.captioner is not None
        captions = {}
        with getattr(self.captioner, "on_device", nullcontext)():  # one trip to the device for all tiles
            for i, (h0, h1, w0, w1) in enumerate(windows):
                report(Progress("caption", i + 1, len(windows)))
                crop = x_stage1[..., h0 * 8 : h1 * 8, w0 * 8 : w1 * 8]
                with _timed(timings, "caption", self.device):
                    captions[(h0, h1, w0, w1)] = self.captioner(
                        to_pil(crop, (crop.shape[-1], crop.shape[-2])), params.caption_question
                    )
        return captions

    def _tile_conditions(
        self, tile_captions: Mapping[Window, str] | None, params: RestoreParams, lq_latent: torch.Tensor, batch: int
    ) -> dict[Window, Conditioning] | None:
        if not tile_captions:
            return None
        conds = {}
        for window, text in tile_captions.items():
            crossattn, vector = self.prompts(self.positive_prompt(text, params))
            conds[window] = _expanded(Conditioning(crossattn, vector, lq_latent), batch)
        return conds

    def plan_tiling(self, params: RestoreParams, image_hw: tuple[int, int], batch: int = 1) -> TilingDecision:
        """Which parts of a run on an image of this processing size (pixels) are tiled, per `params.tiling`; batch:
        the rows sampled and decoded together (num_samples)."""
        return plan_tiling(params, image_hw, lambda: self._memory_plan(image_hw[0] * image_hw[1], batch))

    def tile_batch(self, params: RestoreParams, latent_hw: tuple[int, ...], batch: int) -> TileBatch:
        """Tiles per network call of a tiled run: params.tiles_per_batch when set; else as many as the memory
        budget holds by the plan, fewer once that many ran out of memory. The learned size is kept per tile size
        and batch for the pipeline's life: each later job starts at it, and compiles no new shapes."""
        if params.tiles_per_batch:
            return TileBatch(params.tiles_per_batch)
        tile, _ = RestoreSettings.from_params(params).tile(latent_hw)
        if (tile, batch) not in self._tile_batches:
            planned, budget = self._memory_plan((tile * 8) ** 2, batch)
            self._tile_batches[tile, batch] = TileBatch(max(1, int(budget.bytes // planned["sampling"])))
        return self._tile_batches[tile, batch]

    def _memory_plan(self, pixels: int, batch: int) -> tuple[dict[str, float], Budget]:
        per_pixel, budget = self.memory_plan()
        return per_pixel.at(pixels, batch), budget

    def memory_plan(self) -> tuple[StageBytes, Budget]:
        """The traced bytes per pixel of each stage and the budget tiling=auto holds them to (the worker publishes
        them, so the API can tell before a job runs which of its parts would tile)."""
        if self._stage_bytes is None:
            self._stage_bytes = trace_stage_bytes(self.model, cache_dir=self.plan_cache_dir)
        pools = graph_pool_bytes(self.device) if self.model.cuda_graphs else 0
        return self._stage_bytes, memory_budget(self.device, self.resident_bytes(), self.memory_budget_gb, pools)

    def resident_bytes(self) -> int:
        """What the loaded models hold: SUPIR (all of it: offloaded text encoders visit the device too) and a
        captioner that stays on the device (loaded at start). Fixed for a deployment, so is the tiling budget."""
        resident = getattr(self.captioner, "resident_bytes", None)
        return module_bytes(self.model) + (resident() if resident is not None else 0)

    def sampler_windows(self, latent_hw: tuple[int, ...], params: RestoreParams) -> list[Window]:
        """The tiles (latent pixels) a tiled sampler uses for a latent of this size."""
        tile, stride = RestoreSettings.from_params(params).tile(latent_hw)
        return tile_windows(latent_hw[0], latent_hw[1], tile, stride)

    def windows(self, image_size: tuple[int, int], params: RestoreParams) -> list[Window]:
        """The sampler tiles of an image of this size (before upscale and the size plan); [] when it runs untiled."""
        sizes = plan_sizes(image_size, params.upscale, params.min_size)
        if not self.plan_tiling(params, (sizes.process[1], sizes.process[0]), params.num_samples).sampling:
            return []
        return self.sampler_windows((sizes.process[1] // 8, sizes.process[0] // 8), params)


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


def _conditionings(
    prompts: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    control: torch.Tensor,
    batch: int,
) -> tuple[Conditioning, Conditioning]:
    """Both sides of CFG from the encoded ((crossattn, vector), (uc_crossattn, uc_vector)), for every sample."""
    (c_crossattn, c_vector), (uc_crossattn, uc_vector) = prompts
    cond = _expanded(Conditioning(c_crossattn, c_vector, control), batch)
    return cond, _expanded(Conditioning(uc_crossattn, uc_vector, control), batch)


def _check_stop(should_stop: Callable[[], bool] | None, stage: str) -> None:
    if should_stop is not None and should_stop():
        raise Canceled(f"canceled before {stage}")


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in timings.items()}


def _expanded(cond: Conditioning, batch: int) -> Conditioning:
    """Every part with one row (the photo's prompts, its control) for every row of the batch: samples, or faces
    sharing one prompt (views, no copies: linear_cfg's concatenation copies)."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t if t.shape[0] == batch else t.expand(batch, *t.shape[1:])

    return Conditioning(rows(cond.crossattn), rows(cond.vector), rows(cond.control))


@contextmanager
def _timed(timings: dict[str, float], stage: str, device: torch.device) -> Iterator[None]:
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def _checked(stage1: Stage1, process: tuple[int, int], device: torch.device) -> Stage1:
    """A stored stage 1 fits this run only at the same processing size (same input, min_size and upscale)."""
    width, height = process
    if tuple(stage1.x_stage1.shape[-2:]) != (height, width):
        found = f"{stage1.x_stage1.shape[-1]}×{stage1.x_stage1.shape[-2]}"
        message = f"the stage-1 result is {found}; this run processes at {width}×{height} (same min_size and upscale)"
        raise InvalidInput(message, code="invalid_parameter", field="stage1_job")
    return Stage1(stage1.lq_latent.to(device), stage1.x_stage1.to(device))  # in the dtype they were made in
