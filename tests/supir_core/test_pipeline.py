"""RestorationPipeline end to end on the tiny fixture model: sizes, kinds, seeds, cancel, tiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from supir_core.colorfix import adain_color_fix, wavelet_color_fix
from supir_core.denoiser import Conditioning
from supir_core.errors import Canceled
from supir_core.guidance import linear_cfg
from supir_core.params import validate_params
from supir_core.pipeline import PipelineNoise, Progress, RestorationPipeline, RestorationResult, Stage1
from supir_core.sampling import noise_from, restore_edm
from supir_core.schedules import dpmpp_sigmas, sampling_sigmas
from tests.paths import DATA
from tests.supir_core.official import official_dpmpp

FAST = {"min_size": 64, "steps": 3, "seed": 11}
# the smallest sampler tiling with windows in two directions: a 64×48 latent in 6 tiles (2 rows, 3 columns)
TILED = {**FAST, "min_size": 384, "tile_size": 32, "tile_stride": 16, "steps": 2, "tiling": "always"}


@pytest.fixture(scope="module")
def pipeline(tiny_model) -> RestorationPipeline:
    return RestorationPipeline(tiny_model)


@pytest.fixture(scope="module")
def tiled(tiny_model) -> tuple[RestorationPipeline, RestorationResult, list[int]]:
    """A TILED run on a pipeline of its own, as the memory plan batches its tiles, and the tiles of each network
    call (one run that several tests compare against: it cost 3 s of CPU a test)."""
    reference = RestorationPipeline(tiny_model)
    calls = _counting_network(reference, None, None)
    return reference, reference(DATA / "chelsea_degraded.jpg", validate_params(TILED)), calls


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def test_output_is_upscale_times_input(pipeline: RestorationPipeline) -> None:
    result = pipeline(DATA / "chelsea_degraded.jpg", validate_params({**FAST, "upscale": 2}))
    assert result.image.size == (300, 226) and result.image.mode == "RGB"
    assert result.sizes.process == (320, 256)
    assert result.stage1.size == (320, 256)
    assert set(result.seconds) == {"stage1", "conditioning", "encode", "sampling", "decoding"}


def test_rgba_and_grayscale_keep_their_kind(pipeline: RestorationPipeline) -> None:
    rgba = pipeline(DATA / "coffee_rgba.png", validate_params(FAST)).image
    assert rgba.mode == "RGBA" and rgba.size == (120, 80)
    assert rgba.getchannel("A").getpixel((0, 0)) == 0
    gray = pipeline(DATA / "astronaut_gray.png", validate_params(FAST)).image
    assert gray.mode == "L" and gray.size == (96, 96)


def test_same_seed_same_image_other_seed_other_image(pipeline: RestorationPipeline) -> None:
    a = pipeline(DATA / "chelsea_degraded.jpg", validate_params(FAST)).image
    b = pipeline(DATA / "chelsea_degraded.jpg", validate_params(FAST)).image
    c = pipeline(DATA / "chelsea_degraded.jpg", validate_params({**FAST, "seed": 12})).image
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_a_random_seed_is_reported(pipeline: RestorationPipeline) -> None:
    result = pipeline(DATA / "chelsea_degraded.jpg", validate_params({**FAST, "seed": None}))
    seed = result.seed
    again = pipeline(DATA / "chelsea_degraded.jpg", validate_params({**FAST, "seed": seed}))
    assert result.image.tobytes() == again.image.tobytes()


def test_cancel_stops_within_one_step(pipeline: RestorationPipeline) -> None:
    seen: list[Progress] = []
    with pytest.raises(Canceled):
        pipeline(
            DATA / "chelsea_degraded.jpg",
            validate_params({**FAST, "steps": 10}),
            on_progress=seen.append,
            should_stop=lambda: any(p.stage == "sampling" and p.step >= 2 for p in seen),
        )
    assert [p.step for p in seen if p.stage == "sampling"] == [1, 2]
    assert not any(p.stage == "decoding" for p in seen)


def test_user_prompt_goes_before_the_quality_prompt(pipeline: RestorationPipeline) -> None:
    official = pipeline(DATA / "chelsea_degraded.jpg", validate_params({**FAST, "prompt": "A tabby cat."}))
    assert official.prompts.positive.startswith("A tabby cat.Cinematic")  # the default: no separator, as official
    fit = pipeline(
        DATA / "chelsea_degraded.jpg", validate_params({**FAST, "prompt": "A tabby cat.", "prompt_style": "fit"})
    )
    assert fit.prompts.positive.startswith("A tabby cat. Cinematic")


def test_a_captioner_is_used_when_no_prompt_is_given(tiny_model) -> None:
    captured: list[tuple[int, int]] = []

    def captioner(image: Image.Image, question: str | None = None) -> str:
        captured.append(image.size)
        return "A cat on a sofa. "

    result = RestorationPipeline(tiny_model, captioner=captioner)(DATA / "chelsea_degraded.jpg", validate_params(FAST))
    assert captured == [(680, 512)]  # as the official code captions: the 150×113 input at a 512-px short side
    assert result.prompts.caption == "A cat on a sofa. "
    assert result.prompts.positive.startswith("A cat on a sofa. Cinematic")
    none = RestorationPipeline(tiny_model, captioner=captioner)(
        DATA / "chelsea_degraded.jpg", validate_params({**FAST, "caption": "none", "prompt": "A cat."})
    )
    assert len(captured) == 1 and none.prompts.caption == "" and none.prompts.positive.startswith("A cat.Cinematic")
    full = RestorationPipeline(tiny_model, captioner=captioner)(
        DATA / "chelsea_degraded.jpg", validate_params({**FAST, "caption_input": "full"})
    )
    assert captured[-1] == full.sizes.process


def test_the_caption_image_is_the_stage1_image_at_a_512_px_short_side(pipeline: RestorationPipeline) -> None:
    """Official: the input resized (to 704×512, sides rounded to 64) through the robust encoder and the decoder."""
    from supir_core.imageio import load_image, to_model_input, to_pil

    loaded = load_image(DATA / "chelsea_degraded.jpg")
    image = pipeline.caption_image(loaded, torch.zeros(1, 3, 64, 64), validate_params({}))
    vae = pipeline.model.vae
    with torch.inference_mode():
        want = to_pil(vae.decode(vae.encode_lq(to_model_input(loaded.rgb, (704, 512)))), (680, 512))
    assert image.size == (680, 512) and image.tobytes() == want.tobytes()


def test_large_images_sample_in_tiles_and_batching_tiles_changes_nothing(pipeline: RestorationPipeline, tiled) -> None:
    _, one, calls = tiled
    assert calls == [6, 6]  # all 6 tiles of a step in one network call
    four = pipeline(DATA / "chelsea_degraded.jpg", validate_params({**TILED, "tiles_per_batch": 4}))  # 4, then 2
    assert one.tiling.sampling and one.image.size == (150, 113)
    assert np.abs(pixels(one.image) - pixels(four.image)).max() <= 1


def test_per_tile_prompts_reach_their_tiles(pipeline: RestorationPipeline, tiled) -> None:
    params = validate_params(TILED)
    windows = pipeline.windows((150, 113), params)
    assert len(windows) > 1
    plain = tiled[1]
    captioned = pipeline(
        DATA / "chelsea_degraded.jpg", params, tile_captions={w: f"tile {i}. " for i, w in enumerate(windows)}
    )
    assert plain.image.tobytes() != captioned.image.tobytes()


def test_the_tiled_vae_gives_the_untiled_image(pipeline: RestorationPipeline) -> None:
    """VAE chunks share GroupNorm statistics, halos and attention over the whole image, so a tiled run's image is
    the untiled one to within a grey level (per-tile statistics were tens of levels off on this model)."""
    params = {**FAST, "min_size": 384, "steps": 2, "tile_size": 64}
    whole = pipeline(DATA / "chelsea_degraded.jpg", validate_params({**params, "tiling": "never"}))
    tiled = pipeline(
        DATA / "chelsea_degraded.jpg", validate_params({**params, "tiling": "always", "vae_tile_size": 256})
    )
    assert tiled.tiling.vae and not whole.tiling.vae
    assert not tiled.tiling.sampling  # the 64×48 latent fits in one 64² sampler tile
    assert np.abs(pixels(whole.image) - pixels(tiled.image)).max() <= 1


def _recipe_inputs(model, steps: int, noise_steps: int):
    """A non-square LQ image, stand-in conditioning and every random draw of a run, fixed."""
    gen = torch.Generator().manual_seed(5)
    spec = model.spec.unet
    lq = torch.rand(1, 3, 64, 96, generator=gen) * 2 - 1
    c = (torch.randn(1, 77, spec.context_dim, generator=gen), torch.randn(1, spec.adm_in_channels, generator=gen))
    uc = (torch.randn(1, 77, spec.context_dim, generator=gen), torch.randn(1, spec.adm_in_channels, generator=gen))
    latent = (1, 4, 8, 12)
    draws = [torch.randn(latent, generator=gen) for _ in range(2)] + [torch.randn(noise_steps, *latent, generator=gen)]
    return lq, c, uc, draws


@pytest.mark.parametrize(
    "extra",
    [{}, {"sampler": "dpmpp_2m", "steps": 4}, {"sampler": "dpmpp_2m", "steps": 4, "s_noise": 1.003},
     {"restoration_scale": 4.0}, {"linear_control_scale": True, "control_scale_start": 0.2},
     {"linear_cfg": False}, {"color_fix": "adain"}, {"color_fix": "none"}, {"s_churn": 0.0}],
)  # fmt: skip
def test_every_sampler_option_reaches_the_sampler(pipeline: RestorationPipeline, extra: dict) -> None:
    """The recipe's latent equals the sampler loop run by hand with the options under their own names (DPM++: the
    official loop as transcribed in test_sampling), and its image the colour fix the option names, of the decoded
    latent and the stage-1 image."""
    params = validate_params({"steps": 3, "cfg_scale": 5.0, "cfg_scale_start": 2.0, "control_scale": 0.9, **extra})
    dpmpp = params.sampler == "dpmpp_2m"
    lq, c, uc, (posterior, initial, step_noise) = _recipe_inputs(
        pipeline.model, params.steps, params.steps - 2 if dpmpp else params.steps
    )
    with torch.inference_mode():
        stages = pipeline.restore_tensor(
            lq,
            params,
            noise=PipelineNoise.recorded(posterior, initial, step_noise),
            encode_prompts=lambda x, t: (c, uc),
        )
        cond, uncond = Conditioning(*c, stages.lq_latent), Conditioning(*uc, stages.lq_latent)
        w0 = params.cfg_scale_start if params.linear_cfg else params.cfg_scale
        guided = linear_cfg(pipeline.denoiser, cond, uncond, cfg_scale_start=w0, cfg_scale=params.cfg_scale)
        sigma_max = pipeline.denoiser.sigma_max
        if dpmpp:
            sigmas = dpmpp_sigmas(params.steps).double()
            fixed_alpha = lambda x, sigma, alpha: guided(x.float(), sigma.float(), params.control_scale).double()  # noqa: E731
            want = official_dpmpp(fixed_alpha, initial.double(), sigmas, sigma_max, step_noise.double(), params.s_noise)
            want = want[-1].float()
        else:
            want = restore_edm(
                guided,
                initial,
                sampling_sigmas(params.steps),
                sigma_max=sigma_max,
                s_churn=params.s_churn,
                s_noise=params.s_noise,
                restoration_scale=params.restoration_scale,
                control_scale=params.control_scale,
                control_scale_start=params.control_scale_start,
                linear_control_scale=params.linear_control_scale,
                x_center=stages.x_center,
                step_noise=noise_from(step_noise),
            )
    torch.testing.assert_close(stages.sampled_latent, want, rtol=1e-4, atol=1e-4)
    fixes = {
        "wavelet": wavelet_color_fix(stages.decoded, stages.x_stage1),
        "adain": adain_color_fix(stages.decoded, stages.x_stage1),
        "none": stages.decoded,
    }
    torch.testing.assert_close(stages.restored, fixes[params.color_fix], rtol=0, atol=0)
    assert not stages.tiling.sampling and not stages.tiling.vae


def test_an_ordinary_photo_runs_untiled_as_the_official_code_does(pipeline: RestorationPipeline) -> None:
    """800×600 is processed at 1344×1024 (latent 168×128, over one 128² tile): untiled on this CPU, and why;
    tiling=always would tile it in two windows. (One step instead of 50, for the test's time.)"""
    from supir_core.imageio import plan_sizes, to_model_input

    with Image.open(DATA / "chelsea_degraded.jpg") as img:
        photo = img.convert("RGB").resize((800, 600), Image.Resampling.BICUBIC)
    defaults = validate_params({})
    sizes = plan_sizes(photo.size, defaults.upscale, defaults.min_size)
    assert sizes.process == (1344, 1024) and sizes.output == (800, 600)
    assert pipeline.windows(photo.size, defaults) == []  # the photo's sampler tiles, as planned: none

    # the recipe on the photo's model input with fixed draws and prompts, so that both runs share them
    lq = to_model_input(photo, sizes.process)
    _, c, uc, _ = _recipe_inputs(pipeline.model, 1, 1)
    draws = torch.Generator().manual_seed(9)
    noise = [torch.randn(1, 4, 128, 168, generator=draws) for _ in range(2)] + [torch.randn(1, 1, 4, 128, 168)]

    def run(tiling: str, stage1: Stage1 | None = None):
        params = validate_params({"steps": 1, "tiling": tiling})
        with torch.inference_mode():
            return pipeline.restore_tensor(
                lq, params, noise=PipelineNoise.recorded(*noise), encode_prompts=lambda x, t: (c, uc), stage1=stage1
            )

    untiled = run("auto")
    tiling = untiled.tiling
    assert (tiling.policy, tiling.sampling, tiling.vae) == ("auto", False, False)
    assert "fits in" in tiling.reason and tiling.planned_gb is not None and tiling.planned_gb["sampling"] > 0
    assert untiled.tile_captions == {}
    # (that an untiled decision runs the untiled recipe exactly is checked at small sizes, where a run is cheap:
    # test_every_sampler_option_reaches_the_sampler)

    # tiling=always would tile it at the default tile and stride: 128² windows at stride 64, the last one flush with
    # the edge (columns 0 and 40). That the tiled sampler runs exactly these windows as the official code does is
    # the conformance case sampler_tiled's, and the TILED tests' here; a forced run at this size cost a minute of CPU
    forced = pipeline.windows(photo.size, validate_params({"tiling": "always"}))
    assert sorted(forced) == [(0, 128, 0, 128), (0, 128, 40, 168)]  # (rows, columns) in latent pixels


def test_a_small_memory_budget_tiles_and_says_why(tiny_model) -> None:
    from supir_core.speed import SpeedSettings

    lean = RestorationPipeline(tiny_model, speed=SpeedSettings(memory_budget_gb=0.01))  # untiled: 0.026 GB
    params = validate_params({**TILED, "steps": 1, "tiling": "auto"})
    tiling = lean(DATA / "chelsea_degraded.jpg", params).tiling
    assert tiling.sampling and tiling.metadata()["sampling"] == "tiled"
    assert tiling.budget_gb == 0.01 and "exceeds 0.01 GB (the memory_budget_gb setting)" in tiling.reason
    assert not tiling.vae  # 512×384 images are within one VAE tile
    roomy = RestorationPipeline(tiny_model, speed=SpeedSettings(memory_budget_gb=100.0))
    assert not roomy(DATA / "chelsea_degraded.jpg", params).tiling.sampling


def test_prompt_embeddings_are_cached_and_change_nothing(tiny_model) -> None:
    from supir_core.speed import SpeedSettings

    cached = RestorationPipeline(tiny_model, speed=SpeedSettings(prompt_cache=2, offload_text=True))
    uncached = RestorationPipeline(tiny_model, speed=SpeedSettings(prompt_cache=0))
    params = validate_params({**FAST, "prompt": "a cat"})
    first = cached(DATA / "chelsea_degraded.jpg", params).image
    assert cached.prompts.encoded == 2  # positive and negative
    second = cached(DATA / "chelsea_degraded.jpg", params).image
    assert cached.prompts.encoded == 2  # both from the cache
    assert first.tobytes() == second.tobytes() == uncached(DATA / "chelsea_degraded.jpg", params).image.tobytes()
    assert uncached.prompts.encoded == 2
    cached(DATA / "chelsea_degraded.jpg", validate_params({**FAST, "prompt": "a dog"}))
    assert cached.prompts.encoded == 3  # a new positive prompt; the negative one is still cached
    cached(DATA / "chelsea_degraded.jpg", params)
    assert cached.prompts.encoded == 4  # size 2: "a cat" was evicted by "a dog" and the negative prompt
    assert {p.device.type for p in tiny_model.text.parameters()} == {"cpu"}


def _count_text_moves(model, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every move of the text encoders (to the device, or home), recorded; the move itself still happens."""
    moves: list[str] = []
    real_to = model.text.to

    def to(target: str | torch.device) -> torch.nn.Module:
        moves.append("home" if target == "cpu" else "device")  # home is the string "cpu", the device a torch.device
        return real_to(target)

    monkeypatch.setattr(model.text, "to", to)
    return moves


def test_offloaded_text_encoders_visit_the_device_once_for_every_tile_prompt(tiny_model, monkeypatch) -> None:
    from supir_core.speed import SpeedSettings

    moves = _count_text_moves(tiny_model, monkeypatch)
    pipeline = RestorationPipeline(tiny_model, speed=SpeedSettings(offload_text=True))
    params = validate_params({**TILED, "steps": 1, "tiles_per_batch": 6})  # (set: no memory plan to trace)
    windows = pipeline.windows((150, 113), params)
    captions = {w: f"tile {i}. " for i, w in enumerate(windows)}
    pipeline(DATA / "chelsea_degraded.jpg", params, tile_captions=captions)
    assert pipeline.prompts.encoded == len(windows) + 2 > 3  # every tile's prompt, the positive and the negative
    assert moves == ["device", "home"]  # one round trip, not one per prompt
    pipeline(DATA / "chelsea_degraded.jpg", params, tile_captions=captions)
    assert moves == ["device", "home"]  # every prompt cached: no trip at all


def test_prompt_blocks_nest_and_a_failed_move_leaves_the_encoders_home(tiny_model, monkeypatch) -> None:
    from supir_core.prompts import PromptEmbeddings

    moves = _count_text_moves(tiny_model, monkeypatch)
    prompts = PromptEmbeddings(tiny_model.text, torch.device("cpu"), offload=True)
    with prompts.on_device():
        prompts("a")
        with prompts.on_device():
            prompts("b")
        assert moves == ["device"]  # the inner block's end keeps them there
        prompts("c")
    assert moves == ["device", "home"]
    prompts("d")  # outside a block: a visit per encoding, as before
    assert moves == ["device", "home"] * 2

    counting = tiny_model.text.to

    def out_of_memory(target: str | torch.device) -> torch.nn.Module:
        counting(target)
        if target != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")  # after moving (some of) them
        return tiny_model.text

    moves.clear()
    monkeypatch.setattr(tiny_model.text, "to", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError), prompts.on_device():
        prompts("e")
    assert moves == ["device", "home"]  # sent home at once, not left half-moved for the rest of the block
    monkeypatch.setattr(tiny_model.text, "to", counting)
    moves.clear()
    with prompts.on_device():
        prompts("e")  # the next visit moves them again
    assert moves == ["device", "home"]


def test_warm_up_restores_a_throwaway_image(tiny_model) -> None:
    pipeline = RestorationPipeline(tiny_model)
    assert pipeline.warm_up(64, steps=2) > 0
    assert pipeline.prompts.encoded == 2  # the default prompts, now cached for the first job


def test_a_preview_then_stage_two_is_exactly_one_run(pipeline: RestorationPipeline) -> None:
    """The official demo's two steps: stage 1 (and its caption) first, then sampling with an edited prompt from the
    kept stage 1, with no stage 1 run again; same seed and prompt → the very image a single run gives."""
    params = validate_params({**FAST, "caption": "none", "prompt": "my grandmother in her garden"})
    preview = pipeline.preview(DATA / "chelsea_degraded.jpg", params)
    assert preview.stage1_image.size == preview.sizes.process
    assert set(preview.seconds) == {"stage1"}
    kept = type(preview.stage1).from_bytes(preview.stage1.to_bytes())  # as stored between the two jobs
    resumed = pipeline(DATA / "chelsea_degraded.jpg", params, stage1=kept)
    assert "stage1" not in resumed.seconds
    single = pipeline(DATA / "chelsea_degraded.jpg", params)
    assert np.array_equal(pixels(resumed.image), pixels(single.image))
    assert np.array_equal(pixels(single.stage1), pixels(preview.stage1_image))


def test_a_stage_one_of_another_size_is_refused(pipeline: RestorationPipeline) -> None:
    from supir_core.errors import InvalidInput

    preview = pipeline.preview(DATA / "chelsea_degraded.jpg", validate_params(FAST))
    with pytest.raises(InvalidInput, match="same min_size and upscale"):
        pipeline(DATA / "chelsea_degraded.jpg", validate_params({**FAST, "upscale": 2}), stage1=preview.stage1)


def test_quantize_round_is_truncate_plus_at_most_one_level(pipeline: RestorationPipeline) -> None:
    truncated = pipeline(DATA / "chelsea_degraded.jpg", validate_params(FAST))  # the default, as test.py
    rounded = pipeline(DATA / "chelsea_degraded.jpg", validate_params({**FAST, "quantize": "round"}))
    difference = pixels(rounded.image) - pixels(truncated.image)
    assert set(np.unique(difference).tolist()) <= {0.0, 1.0}
    assert 0.3 < difference.mean() < 0.7  # about half a level brighter on average


def _counting_network(pipeline: RestorationPipeline, fail_above: int | None, error: Exception | None) -> list[int]:
    """Wrap the pipeline's network: raise `error` above `fail_above` tiles in a call, as a device out of memory
    would; the tiles of each call that ran (CFG: 2 rows a tile, one sample)."""
    real, ran = pipeline.denoiser.network, []

    def network(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if fail_above is not None and x.shape[0] // 2 > fail_above:
            assert error is not None
            raise error
        ran.append(x.shape[0] // 2)
        return real(x, *args, **kwargs)

    pipeline.denoiser.network = network
    return ran


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    ],
    ids=["OutOfMemoryError", "cublas_alloc"],
)
def test_tiles_that_run_out_of_memory_are_split_and_the_next_job_starts_at_what_fitted(
    tiny_model, tiled, error: Exception
) -> None:
    params = validate_params(TILED)
    reference, expected, fine = tiled
    windows = len(reference.windows((150, 113), params))
    assert fine == [windows] * 2  # memory to spare (this CPU): all tiles of a step in one call

    short = RestorationPipeline(tiny_model)
    first = _counting_network(short, 2, error)
    result = short(DATA / "chelsea_degraded.jpg", params)  # 6 tiles fail, 3 fail, 2 fit: the job succeeds
    # step 1: 6 fail, 3 fail, then 2 + 1 for each half; step 2: groups of 2 from the start
    assert first == [2, 1, 2, 1, 2, 2, 2]
    assert np.abs(pixels(result.image) - pixels(expected.image)).max() <= 1

    second = _counting_network(short, 2, error)
    short(DATA / "chelsea_degraded.jpg", params)
    assert second == [2, 2, 2] * 2  # starts at the size that fitted: no error, no new shapes


def test_an_error_that_is_not_out_of_memory_is_not_retried_in_smaller_groups(tiny_model) -> None:
    pipeline = RestorationPipeline(tiny_model)
    calls = _counting_network(pipeline, 2, RuntimeError("expected all tensors to be on the same device"))
    with pytest.raises(RuntimeError, match="same device"):
        pipeline(DATA / "chelsea_degraded.jpg", validate_params(TILED))
    assert calls == []


def test_tiles_per_call_are_planned_from_the_memory_budget(tiny_model) -> None:
    from supir_core.memory import trace_stage_bytes
    from supir_core.speed import SpeedSettings

    per_tile = trace_stage_bytes(tiny_model).at((32 * 8) ** 2)["sampling"]
    budget_gb = 3.5 * per_tile / 1e9  # room for 3 tiles a call
    lean = RestorationPipeline(tiny_model, speed=SpeedSettings(memory_budget_gb=budget_gb))
    calls = _counting_network(lean, None, None)
    lean(DATA / "chelsea_degraded.jpg", validate_params(TILED))
    assert calls == [3, 3] * 2
