"""Several samples of one photo (issue 17): one batched sampler run, sample i = the single run with seed + i."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from supir_core.denoiser import Conditioning, Denoiser
from supir_core.guidance import tiled_cfg
from supir_core.memory import GB, trace_stage_bytes
from supir_core.params import sample_seeds, validate_params
from supir_core.pipeline import PipelineNoise, Progress, RestorationPipeline
from supir_core.speed import SpeedSettings
from tests.paths import DATA

PHOTO = DATA / "chelsea_degraded.jpg"
FAST = {"min_size": 64, "steps": 3, "seed": 11, "caption": "none"}
TILED = {"tiling": "always", "tile_size": 32, "tile_stride": 16}
# Batched and single network calls sum in different orders (fp32 CPU kernels block by batch): the latents and
# images of a sample and of its single run differ by ~5e-5 here, so 1e-4 (test_pipeline's recipe tolerance) —
# far below the ~3 that separates two samples. PIL images: within one grey level (rounding of such differences).
TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def pipeline(tiny_model) -> RestorationPipeline:
    return RestorationPipeline(tiny_model)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


@contextmanager
def batches_of(module: torch.nn.Module) -> Iterator[list[int]]:
    """The batch of every forward call of `module` inside the block."""
    seen: list[int] = []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    try:
        yield seen
    finally:
        handle.remove()


def test_samples_share_stage_one_and_every_unet_call(pipeline: RestorationPipeline) -> None:
    model = pipeline.model
    progress: list[Progress] = []
    with batches_of(model.unet) as unet, batches_of(model.vae.robust_encoder) as stage1:
        three = pipeline(PHOTO, validate_params({**FAST, "num_samples": 3}), on_progress=progress.append)
    assert unet == [2 * 3] * FAST["steps"] and stage1 == [1]  # both CFG branches of the 3 samples in one call
    assert [p.step for p in progress if p.stage == "sampling"] == [1, 2, 3]  # steps count once, not per sample
    with batches_of(model.unet) as unet:
        one = pipeline(PHOTO, validate_params(FAST))
    assert unet == [2] * FAST["steps"]
    assert three.seeds == sample_seeds(11, 3) == [11, 12, 13] and three.seed == 11
    assert one.seeds == [11] and one.images == [one.image]
    assert len(three.images) == 3 and three.image is three.images[0]
    assert all(img.size == (150, 113) and img.mode == "RGB" for img in three.images)
    assert len({img.tobytes() for img in three.images}) == 3
    assert np.abs(pixels(three.images[0]) - pixels(one.image)).max() <= 1


def test_each_image_is_the_single_run_of_its_seed(pipeline: RestorationPipeline) -> None:
    params = {**FAST, "seed": 2**31 - 2}  # the seeds wrap: 2³¹ − 2, 2³¹ − 1, 0
    batch = pipeline(DATA / "coffee_rgba.png", validate_params({**params, "num_samples": 3}))
    assert batch.seeds == [2**31 - 2, 2**31 - 1, 0]
    for seed, image in zip(batch.seeds, batch.images, strict=True):
        single = pipeline(DATA / "coffee_rgba.png", validate_params({**params, "seed": seed})).image
        assert image.mode == single.mode == "RGBA" and np.abs(pixels(image) - pixels(single)).max() <= 1


def _prompts(model) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    spec = model.spec.unet
    c = (torch.randn(1, 77, spec.context_dim, generator=gen), torch.randn(1, spec.adm_in_channels, generator=gen))
    uc = (torch.randn(1, 77, spec.context_dim, generator=gen), torch.randn(1, spec.adm_in_channels, generator=gen))
    return c, uc


@pytest.mark.parametrize(
    ("extra", "hw"),
    [({}, (64, 96)), ({"sampler": "dpmpp_2m", "steps": 4}, (64, 96)),
     ({"sampler": "dpmpp_2m", "dpmpp_full_guidance": True, "restoration_scale": 4.0}, (64, 96)),
     ({"restoration_scale": 4.0, "color_fix": "adain"}, (64, 96)),
     (TILED, (256, 320)), ({**TILED, "tiles_per_batch": 1, "tile_captions": 1}, (256, 320))],
)  # fmt: skip
def test_sample_i_is_the_single_run_with_seed_i(pipeline: RestorationPipeline, extra: dict, hw: tuple) -> None:
    """Every stage's tensors, for the samplers, restoration guidance, colour fixes, the tiled sampler (tile groups
    of one or all windows) and per-tile prompts. (Tiled: two samples, two steps, for the test's time.)"""
    extra = dict(extra)
    captioned = extra.pop("tile_captions", False)
    lq = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(3)) * 2 - 1
    c, uc = _prompts(pipeline.model)
    seeds = sample_seeds(7, 2 if "tiling" in extra else 3)

    def run(seed: int | list[int], num_samples: int):
        params = validate_params({"steps": 2 if "tiling" in extra else 3, **extra, "num_samples": num_samples})
        windows = pipeline.sampler_windows((hw[0] // 8, hw[1] // 8), params) if captioned else []
        with torch.inference_mode():
            return pipeline.restore_tensor(
                lq,
                params,
                noise=PipelineNoise.seeded(seed, pipeline.device),
                encode_prompts=lambda x, tiles: (c, uc),
                tile_captions={w: f"tile {i}. " for i, w in enumerate(windows)} or None,
            )

    batch = run(seeds, len(seeds))
    assert batch.tiling.sampling == bool(extra.get("tiling")) and bool(batch.tile_captions) == bool(captioned)
    assert batch.lq_latent.shape[0] == batch.x_stage1.shape[0] == 1
    assert batch.sampled_latent.shape[0] == batch.decoded.shape[0] == batch.restored.shape[0] == len(seeds)
    for i, seed in enumerate(seeds):
        single = run(seed, 1)
        torch.testing.assert_close(batch.x_center[i : i + 1], single.x_center, **TOL)
        torch.testing.assert_close(batch.sampled_latent[i : i + 1], single.sampled_latent, **TOL)
        torch.testing.assert_close(batch.restored[i : i + 1], single.restored, **TOL)
    assert (batch.restored[0] - batch.restored[1]).abs().max() > 0.1


def test_the_tiled_vae_decodes_every_sample_as_alone(pipeline: RestorationPipeline) -> None:
    vae = pipeline.model.vae
    latents = torch.randn(2, 4, 40, 48, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        both = vae.decode(latents, tile=256)  # 320×384 pixels: tiled
        for i in range(2):
            torch.testing.assert_close(both[i : i + 1], vae.decode(latents[i : i + 1], tile=256), **TOL)


def test_tiled_guidance_splits_windows_with_all_their_samples_on_oom() -> None:
    """Out of memory, tiled_cfg halves the windows of a call; each window keeps its B sample rows together."""
    samples, windows = 2, [(0, 4, 0, 4), (0, 4, 4, 8), (4, 8, 0, 4), (4, 8, 4, 8)]
    calls: list[int] = []

    def network(x, t, context, vector, hint, control_scale=1.0):
        calls.append(x.shape[0])
        if x.shape[0] > 2 * samples * 2:  # room for two windows' CFG batches
            raise torch.OutOfMemoryError("test: too many rows")
        return x * 0.5 + hint + context.mean((1, 2))[:, None, None, None]

    gen = torch.Generator().manual_seed(0)
    control = torch.randn(samples, 4, 8, 8, generator=gen)
    cond = Conditioning(torch.randn(samples, 77, 8, generator=gen), torch.randn(samples, 16, generator=gen), control)
    uncond = Conditioning(torch.zeros(samples, 77, 8), torch.zeros(samples, 16), control)
    x = torch.randn(len(windows) * samples, 4, 4, 4, generator=gen)  # window-major, sample-minor rows
    sigma = torch.full((x.shape[0],), 3.0)
    split = tiled_cfg(Denoiser(network), cond, uncond, 2.0, 4.0)(x, sigma, 1.0, windows)
    assert calls == [2 * 4 * samples, 2 * 2 * samples, 2 * 2 * samples]
    whole = torch.cat(
        [tiled_cfg(Denoiser(network), cond, uncond, 2.0, 4.0)(x[2 * k : 2 * k + 2], sigma[:2], 1.0, [w])
         for k, w in enumerate(windows)]
    )  # fmt: skip
    torch.testing.assert_close(split, whole)


def test_the_memory_plan_counts_every_sample(tiny_model) -> None:
    """A budget that holds one sample's untiled sampling but not four: tiling=auto tiles the run of four."""
    process = (320, 256)  # the photo at min_size 256: a 40×32 latent, over one 32² sampler tile
    per_sample = trace_stage_bytes(tiny_model).at(process[0] * process[1])["sampling"]
    lean = RestorationPipeline(tiny_model, speed=SpeedSettings(memory_budget_gb=2 * per_sample / GB))
    params = {**FAST, "min_size": 256, "tile_size": 32, "tile_stride": 16, "steps": 1}
    one_run = lean(PHOTO, validate_params(params))
    one, four = one_run.tiling, lean(PHOTO, validate_params({**params, "num_samples": 4})).tiling
    assert one_run.sizes.process == process
    assert not one.sampling and "fits in" in one.reason
    assert four.sampling and "exceeds" in four.reason
    assert one.planned_gb is not None and four.planned_gb is not None
    planned = four.planned_gb["sampling"], one.planned_gb["sampling"]
    assert planned[0] == pytest.approx(4 * planned[1], rel=0.01)  # of figures rounded to 0.1 MB
    assert four.planned_gb["stage1"] == one.planned_gb["stage1"]  # run once per photo
    assert lean.windows((150, 113), validate_params({**params, "num_samples": 4}))
    assert not lean.windows((150, 113), validate_params(params))


def test_a_preview_then_several_samples_is_one_run(pipeline: RestorationPipeline) -> None:
    """A preview shows one stage-1 image whatever num_samples; its kept stage 1 gives the direct run's samples."""
    params = validate_params({**FAST, "num_samples": 2, "prompt": "a cat"})
    preview = pipeline.preview(PHOTO, params)
    kept = type(preview.stage1).from_bytes(preview.stage1.to_bytes())
    assert kept.x_stage1.shape[0] == 1
    resumed = pipeline(PHOTO, params, stage1=kept)
    direct = pipeline(PHOTO, params)
    assert "stage1" not in resumed.seconds and resumed.seeds == [11, 12]
    assert len(resumed.images) == len(direct.images) == 2
    for a, b in zip(resumed.images, direct.images, strict=True):
        assert np.array_equal(pixels(a), pixels(b))


def test_samples_of_a_batch_of_images_are_refused(pipeline: RestorationPipeline) -> None:
    c, uc = _prompts(pipeline.model)
    with pytest.raises(ValueError, match="num_samples=2 restores one image"):
        pipeline.restore_tensor(
            torch.zeros(2, 3, 64, 64),
            validate_params({"num_samples": 2}),
            noise=PipelineNoise.seeded([1, 2], pipeline.device),
            encode_prompts=lambda x, tiles: (c, uc),
        )
