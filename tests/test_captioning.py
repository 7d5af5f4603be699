"""Captioning with a tiny random LLaVA loaded through the production path; prompt composition."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from supir_core.captioning import CaptionSettings, LlavaCaptioner, compose_positive
from supir_core.errors import WeightsError
from supir_core.models.text import ClipTokenizer
from supir_core.params import QUALITY_PROMPT, validate_params
from supir_core.pipeline import RestorationPipeline

DATA = Path(__file__).parent / "data"


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


def test_pad_to_square_keeps_the_sides(tiny_llava: Path) -> None:
    padded = LlavaCaptioner(tiny_llava, settings=CaptionSettings(max_new_tokens=4, pad_to_square=True))
    with Image.open(DATA / "chelsea_degraded.jpg") as img:
        assert isinstance(padded(img), str)


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


def test_a_tiled_job_captions_every_tile(tiny_model, captioner: LlavaCaptioner) -> None:
    calls: list[tuple[int, int]] = []

    def counting(image: Image.Image, question: str | None = None) -> str:
        calls.append(image.size)
        return captioner(image, question)

    pipeline = RestorationPipeline(tiny_model, captioner=counting)
    params = validate_params({"min_size": 512, "tile_size": 32, "tile_stride": 16, "steps": 2, "seed": 0})
    result = pipeline(DATA / "chelsea_degraded.jpg", params)
    windows = pipeline.windows((150, 113), params)
    assert len(calls) == len(windows) > 1 and set(calls) == {(256, 256)}
    assert [c["window"] for c in result.metadata["tile_captions"]] == [list(w) for w in windows]
    assert result.metadata["seconds"]["caption"] > 0
    untiled = pipeline(DATA / "chelsea_degraded.jpg", validate_params({"min_size": 64, "steps": 2, "seed": 0}))
    assert untiled.metadata["caption"] and untiled.metadata["tile_captions"] == []
