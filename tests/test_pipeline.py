"""RestorationPipeline end to end on the tiny fixture model: sizes, kinds, seeds, cancel, tiling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from supir_core.errors import Canceled
from supir_core.params import validate_params
from supir_core.pipeline import Progress, RestorationPipeline

DATA = Path(__file__).parent / "data"
FAST = {"min_size": 64, "steps": 3, "seed": 11}


@pytest.fixture(scope="module")
def pipeline(tiny_model) -> RestorationPipeline:
    return RestorationPipeline(tiny_model)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def test_output_is_upscale_times_input(pipeline: RestorationPipeline) -> None:
    result = pipeline(DATA / "chelsea_degraded.jpg", validate_params({**FAST, "upscale": 2}))
    assert result.image.size == (300, 226) and result.image.mode == "RGB"
    assert result.metadata["process_size"] == [320, 256]
    assert result.stage1.size == (320, 256)
    assert set(result.metadata["seconds"]) == {"stage1", "conditioning", "sampling", "decoding"}


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
    seed = result.metadata["seed"]
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
    result = pipeline(DATA / "chelsea_degraded.jpg", validate_params({**FAST, "prompt": "A tabby cat."}))
    assert result.metadata["positive_prompt"].startswith("A tabby cat. Cinematic")
    official = pipeline(
        DATA / "chelsea_degraded.jpg", validate_params({**FAST, "prompt": "A tabby cat.", "prompt_style": "official"})
    )
    assert official.metadata["positive_prompt"].startswith("A tabby cat.Cinematic")


def test_a_captioner_is_used_when_no_prompt_is_given(tiny_model) -> None:
    captured: list[tuple[int, int]] = []

    def captioner(image: Image.Image, question: str | None = None) -> str:
        captured.append(image.size)
        return "A cat on a sofa. "

    result = RestorationPipeline(tiny_model, captioner=captioner)(DATA / "chelsea_degraded.jpg", validate_params(FAST))
    assert captured == [tuple(result.metadata["process_size"])]
    assert result.metadata["caption"] == "A cat on a sofa. "
    assert result.metadata["positive_prompt"].startswith("A cat on a sofa. Cinematic")
    none = RestorationPipeline(tiny_model, captioner=captioner)(
        DATA / "chelsea_degraded.jpg", validate_params({**FAST, "caption": "none", "prompt": "A cat."})
    )
    assert (
        len(captured) == 1 and none.metadata["caption"] == "" and none.metadata["positive_prompt"].startswith("A cat. ")
    )


def test_large_images_sample_in_tiles_and_batching_tiles_changes_nothing(pipeline: RestorationPipeline) -> None:
    params = {**FAST, "min_size": 512, "tile_size": 32, "tile_stride": 16, "steps": 2}
    one = pipeline(DATA / "chelsea_degraded.jpg", validate_params(params))
    four = pipeline(DATA / "chelsea_degraded.jpg", validate_params({**params, "tiles_per_batch": 4}))
    assert one.metadata["tiled_sampling"] and one.image.size == (150, 113)
    assert np.abs(pixels(one.image) - pixels(four.image)).max() <= 1


def test_per_tile_prompts_reach_their_tiles(pipeline: RestorationPipeline) -> None:
    params = validate_params({**FAST, "min_size": 512, "tile_size": 32, "tile_stride": 16, "steps": 2})
    windows = pipeline.windows((150, 113), params)
    assert len(windows) > 1
    plain = pipeline(DATA / "chelsea_degraded.jpg", params)
    captioned = pipeline(
        DATA / "chelsea_degraded.jpg", params, tile_captions={w: f"tile {i}. " for i, w in enumerate(windows)}
    )
    assert plain.image.tobytes() != captioned.image.tobytes()


def test_tiled_vae_stays_close_to_untiled(pipeline: RestorationPipeline) -> None:
    """Tiles see only their neighbourhood; on the tiny random VAE the gap is a few grey levels at 256-px tiles."""
    params = {**FAST, "min_size": 384, "steps": 2, "tile_size": 64}
    whole = pipeline(DATA / "chelsea_degraded.jpg", validate_params(params))
    tiled = pipeline(DATA / "chelsea_degraded.jpg", validate_params({**params, "vae_tile_size": 256}))
    assert tiled.metadata["tiled_vae"] and not whole.metadata["tiled_vae"]
    diff = np.abs(pixels(whole.image) - pixels(tiled.image))
    assert 0 < diff.mean() < 40


@pytest.mark.parametrize("extra", [{"sampler": "dpmpp_2m"}, {"restoration_scale": 4.0}, {"linear_control_scale": True},
                                   {"color_fix": "adain"}, {"color_fix": "none"}, {"linear_cfg": False}])  # fmt: skip
def test_every_sampler_path_runs(pipeline: RestorationPipeline, extra: dict) -> None:
    result = pipeline(DATA / "astronaut_gray.png", validate_params({**FAST, **extra}))
    assert result.image.size == (96, 96)
    assert np.isfinite(pixels(result.image)).all()


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


def test_warm_up_restores_a_throwaway_image(tiny_model) -> None:
    pipeline = RestorationPipeline(tiny_model)
    assert pipeline.warm_up(64, steps=2) > 0
    assert pipeline.prompts.encoded == 2  # the default prompts, now cached for the first job
