"""Captioning with a tiny random LLaVA loaded through the production path; prompt composition."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from supir_core.captioning import (
    CaptionSettings,
    LlavaCaptioner,
    compose_positive,
    expand_to_square,
    mean_colour,
)
from supir_core.errors import WeightsError
from supir_core.models.text import ClipTokenizer
from supir_core.params import QUALITY_PROMPT, validate_params
from supir_core.pipeline import RestorationPipeline
from tests.paths import DATA


@pytest.fixture(scope="module")
def captioner(tiny_llava: Path) -> LlavaCaptioner:
    return LlavaCaptioner(tiny_llava, settings=CaptionSettings(max_new_tokens=12))


def test_llava_loads_from_a_local_directory_and_captions(captioner: LlavaCaptioner) -> None:
    with Image.open(DATA / "chelsea_degraded.jpg") as img:
        first = captioner(img)
        again = captioner(img, "Describe this image and its style in a very detailed manner.")
        other = captioner(img, "What colour is it?")
    assert captioner.loaded
    assert first and first == again  # seeded sampling: the same image and question, the same caption
    assert set(first.split()) <= set(Path(captioner.source, "tokenizer.json").read_text().split('"'))
    assert isinstance(other, str)


def test_unload_between_jobs(tiny_llava: Path) -> None:
    lean = LlavaCaptioner(tiny_llava, keep_loaded=False, settings=CaptionSettings(max_new_tokens=4))
    with Image.open(DATA / "astronaut_gray.png") as img:
        assert lean(img)
    assert not lean.loaded


def test_several_captions_share_one_load(tiny_llava: Path) -> None:
    lean = LlavaCaptioner(tiny_llava, keep_loaded=False, settings=CaptionSettings(max_new_tokens=4))
    with Image.open(DATA / "astronaut_gray.png") as img, lean.on_device():
        lean(img)
        assert lean.loaded  # still loaded between the captions of one block (a tiled job's tiles)
        lean(img)
    assert not lean.loaded


def test_offloaded_captioner_gives_the_same_caption(captioner: LlavaCaptioner, tiny_llava: Path) -> None:
    offloaded = LlavaCaptioner(tiny_llava, offload=True, settings=captioner.settings)
    with Image.open(DATA / "chelsea_degraded.jpg") as img:
        assert offloaded(img) == captioner(img)
    assert offloaded.loaded


def test_a_move_to_the_device_that_fails_half_way_leaves_the_model_at_home(
    tiny_llava: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here: float64 weights stand for weights on the device. The first visit runs out of memory after
    moving half the weights; the model must go home whole, so the next caption works (on a GPU a half-moved
    model fails every later caption with a device mismatch)."""
    captioner = LlavaCaptioner(
        tiny_llava, device="cuda", dtype=torch.float32, offload=True, settings=CaptionSettings(max_new_tokens=4)
    )
    captioner.load()
    model = captioner._model
    real_to = model.to
    moves: list[str] = []

    def flaky_to(target: str | torch.device) -> torch.nn.Module:
        moves.append(str(target))
        if str(target) == "cpu":
            return real_to(torch.float32)
        if len(moves) == 1:  # the first visit: half the weights make it, then the device is full
            params = list(model.parameters())
            for param in params[: len(params) // 2]:
                param.data = param.data.to(torch.float64)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")
        return real_to(torch.float64)

    monkeypatch.setattr(model, "to", flaky_to)
    with Image.open(DATA / "astronaut_gray.png") as img:
        with pytest.raises(torch.OutOfMemoryError):
            captioner(img)
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # all home, none left "on the device"
        assert captioner._visits == 0
        assert isinstance(captioner(img), str)  # the next caption visits the device and comes back
    assert moves == ["cuda", "cpu", "cuda", "cpu"]
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def _three_bands(width: int, height: int) -> Image.Image:
    """A wide image: red left quarter, green centre half, blue right quarter."""
    image = Image.new("RGB", (width, height), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, width // 4, height))
    image.paste((0, 0, 255), (width - width // 4, 0, width, height))
    return image


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    return (torch.tensor(rgb) / 255 - mean) / std


def test_pad_to_square_keeps_the_sides(captioner: LlavaCaptioner, tiny_llava: Path) -> None:
    padded = LlavaCaptioner(tiny_llava, settings=CaptionSettings(max_new_tokens=4, pad_to_square=True))
    wide = _three_bands(300, 100)  # 3:1; the tiny processor resizes to 28 high and crops 28 x 28
    with padded.on_device(), captioner.on_device():
        square = padded.prepare(wide)["pixel_values"][0]
        cropped = captioner.prepare(wide)["pixel_values"][0]
    assert square.shape == cropped.shape == (3, 28, 28)
    # unpadded: the centre crop holds green only, the sides are lost
    assert torch.allclose(cropped, _normalised((0, 255, 0))[:, None, None].expand_as(cropped), atol=0.05)
    # padded: the whole image sits in rows ~9.3-18.7, between bands of the mean colour (0 once normalised)
    assert square[:, :7].abs().max() < 0.05 and square[:, 22:].abs().max() < 0.05
    assert torch.allclose(square[:, 14, 2], _normalised((255, 0, 0)), atol=0.05)
    assert torch.allclose(square[:, 14, 14], _normalised((0, 255, 0)), atol=0.05)
    assert torch.allclose(square[:, 14, 25], _normalised((0, 0, 255)), atol=0.05)
    assert padded(wide)  # and it captions


def test_expand_to_square_centres_the_image_on_the_fill() -> None:
    tall = expand_to_square(Image.new("RGB", (10, 30), (255, 255, 255)), (1, 2, 3))
    assert tall.size == (30, 30)
    assert tall.getpixel((0, 0)) == tall.getpixel((29, 29)) == (1, 2, 3)
    assert tall.getpixel((10, 0)) == tall.getpixel((19, 29)) == (255, 255, 255)
    assert tall.getpixel((9, 15)) == tall.getpixel((20, 15)) == (1, 2, 3)
    square = Image.new("RGB", (8, 8))
    assert expand_to_square(square, (1, 2, 3)) is square


def test_the_padding_colour_is_the_processors_mean() -> None:
    assert mean_colour(object()) == (122, 116, 104)  # no image processor: CLIP's mean, as LLaVA-1.5 pads
    processor = SimpleNamespace(image_processor=SimpleNamespace(image_mean=[0.5, 0.25, 1.0]))
    assert mean_colour(processor) == (127, 63, 255)


def test_captioning_leaves_the_global_random_state_alone(captioner: LlavaCaptioner) -> None:
    with Image.open(DATA / "chelsea_degraded.jpg") as img:
        torch.manual_seed(1234)
        before = torch.random.get_rng_state()
        first = captioner(img)
        assert torch.equal(torch.random.get_rng_state(), before)
        torch.manual_seed(99)  # another global state: the caption's own seed decides, not this one
        again = captioner(img)
    assert first and first == again


def test_bad_sources_are_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such LLaVA directory"):
        LlavaCaptioner(tmp_path / "nowhere")(Image.new("RGB", (32, 32)))
    with pytest.raises(WeightsError, match="needs a CUDA device"):
        LlavaCaptioner(tmp_path, quantization="4bit")
    with pytest.raises(WeightsError, match="offload or quantization"):
        LlavaCaptioner(tmp_path, device="cuda", quantization="4bit", offload=True)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="cannot load LLaVA"):
        LlavaCaptioner(tmp_path)(Image.new("RGB", (32, 32)))


def test_the_quality_prompt_survives_a_long_caption() -> None:
    tokenizer = ClipTokenizer()
    caption = "The image features a close-up of an elderly man with a gray beard, wearing a knitted wool hat " * 4
    composed = compose_positive(caption, "In the snow.", QUALITY_PROMPT, tokenizer.count)
    assert composed.startswith("The image features") and composed.endswith(f"In the snow. {QUALITY_PROMPT}")
    assert tokenizer.count(composed) <= 75
    assert compose_positive("", "", QUALITY_PROMPT, tokenizer.count) == QUALITY_PROMPT
    assert compose_positive("A cat", "", QUALITY_PROMPT, tokenizer.count) == f"A cat, {QUALITY_PROMPT}"
    assert compose_positive("A cat.", "Sharp", "", tokenizer.count) == "A cat. Sharp"


def test_a_tiled_job_captions_every_tile_only_when_asked(tiny_model, captioner: LlavaCaptioner) -> None:
    calls: list[tuple[int, int]] = []

    def counting(image: Image.Image, question: str | None = None) -> str:
        calls.append(image.size)
        return captioner(image, question)

    pipeline = RestorationPipeline(tiny_model, captioner=counting)
    tiled = {"min_size": 512, "tile_size": 32, "tile_stride": 16, "steps": 2, "seed": 0, "tiling": "always"}
    one_caption = pipeline(DATA / "chelsea_degraded.jpg", validate_params(tiled))  # the default: as official
    assert one_caption.tiling.sampling and one_caption.tile_captions == {} and len(calls) == 1
    assert one_caption.prompts.caption

    calls.clear()
    params = validate_params({**tiled, "caption_tiles": True})
    result = pipeline(DATA / "chelsea_degraded.jpg", params)
    windows = pipeline.windows((150, 113), params)
    assert len(calls) == len(windows) > 1 and set(calls) == {(256, 256)}
    assert list(result.tile_captions) == windows
    assert result.seconds["caption"] > 0
    untiled = pipeline(DATA / "chelsea_degraded.jpg", validate_params({"min_size": 64, "steps": 2, "seed": 0}))
    assert untiled.prompts.caption and untiled.tile_captions == {}


def _fixture_prompts(fixture_a: Path) -> list[dict]:
    cases = json.loads((fixture_a / "config.json").read_text())["cases"]
    return next(c for c in cases if c["kind"] == "text_conditioning")["params"]["prompts"]


def test_the_default_prompt_is_the_official_joining_of_a_long_caption(tiny_model, fixture_a: Path) -> None:
    """The fixture's `positive` strings are what the official code made of caption + p_p; a captioned job with
    default parameters must be conditioned on exactly that, token for token (CLIP's cut included)."""
    long = next(p for p in _fixture_prompts(fixture_a) if p["truncated_positive"])
    pipeline = RestorationPipeline(tiny_model, captioner=lambda image, question=None: long["caption"])
    params = validate_params({"min_size": 64, "steps": 1, "seed": 0, "positive_prompt": long["p_p"]})
    result = pipeline(DATA / "chelsea_degraded.jpg", params)
    assert result.prompts.caption == long["caption"]
    assert result.prompts.positive == long["positive"]

    fit = pipeline.positive_prompt(long["caption"], params.model_copy(update={"prompt_style": "fit"}))
    assert fit != long["positive"]
    official_ids = tiny_model.text.tokenize([long["positive"]])
    fit_ids = tiny_model.text.tokenize([fit])
    assert any(not torch.equal(a, b) for a, b in zip(official_ids, fit_ids, strict=True))


def test_a_captioner_that_stays_loaded_counts_in_the_tiling_budget(tiny_model, tiny_llava: Path) -> None:
    from supir_core.memory import module_bytes

    resident = LlavaCaptioner(tiny_llava)
    assert resident.resident_bytes() == 0  # not loaded yet (the worker and the CLI load it at start)
    resident.load()
    assert resident.resident_bytes() == module_bytes(resident._model) > 0
    offloaded = LlavaCaptioner(tiny_llava, offload=True)
    offloaded.load()
    assert offloaded.resident_bytes() == 0  # waits in host memory between captions
    pipeline = RestorationPipeline(tiny_model, captioner=resident)
    assert pipeline.resident_bytes() == module_bytes(tiny_model) + resident.resident_bytes()
