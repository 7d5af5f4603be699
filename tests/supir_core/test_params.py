"""Parameter validation in one place: every error names the parameter, the value and the range."""

from __future__ import annotations

import pytest

from supir_core.errors import InvalidInput
from supir_core.params import NEGATIVE_PROMPT, PRESETS, QUALITY_PROMPT, RestoreParams, validate_params


def test_defaults_are_the_official_test_py_ones() -> None:
    p = validate_params({})
    assert (p.steps, p.cfg_scale, p.cfg_scale_start, p.s_churn, p.s_noise) == (50, 4.0, 1.0, 5.0, 1.01)
    assert (p.control_scale, p.restoration_scale, p.color_fix, p.min_size, p.upscale) == (
        1.0,
        -1.0,
        "wavelet",
        1024,
        1.0,
    )
    assert p.positive_prompt == QUALITY_PROMPT and p.negative_prompt == NEGATIVE_PROMPT


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_apply_and_user_values_win(preset: str) -> None:
    p = validate_params({"seed": 7}, preset=preset)
    for key, value in PRESETS[preset].items():
        assert getattr(p, key) == value
    assert validate_params({"cfg_scale": 9.0}, preset=preset).cfg_scale == 9.0


def test_lightning_is_the_official_lightning_config() -> None:
    p = validate_params({}, preset="lightning")
    assert (p.sampler, p.steps, p.cfg_scale, p.cfg_scale_start, p.s_noise) == ("dpmpp_2m", 8, 2.0, 2.0, 1.003)


def test_the_defaults_take_the_official_untiled_path() -> None:
    p = validate_params({})
    assert (p.tiling, p.caption_input, p.sampler, p.steps, p.s_noise) == ("auto", "official", "edm", 50, 1.01)
    for value in ("sometimes", "", 3):
        with pytest.raises(InvalidInput, match="tiling"):
            validate_params({"tiling": value})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"upscale": 12}, "upscale=12 is out of range: allowed 1.0 to 8.0"),
        ({"steps": 0}, "steps=0 is out of range: allowed 1 to 200"),
        ({"seed": -1}, "seed=-1 is out of range: allowed 0 to 2147483647"),
        ({"color_fix": "sepia"}, "color_fix='sepia'"),
        ({"tile_stride": 200}, "tile_stride=200 must not exceed tile_size=128"),
        ({"tile_size": 100}, "tile_size=100: Input should be a multiple of 8"),
        ({"seed": False}, "seed=False: must be a number or null"),  # JSON's types, no coercion
        ({"steps": None}, "steps=None: must be a number"),  # null only where a field allows it
        ({"steps": "5"}, "steps='5': must be a number"),
        ({"linear_cfg": 1}, "linear_cfg=1: must be true or false"),
        ({"steps": 7.5}, "steps=7.5: Input should be a valid integer"),
        ({"cfg_scale": "high"}, "cfg_scale='high'"),
        ({"strength": 1}, "strength: unknown parameter"),
    ],
)
def test_bad_values_are_named(raw: dict, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_params(raw)
    assert message in info.value.message


def test_integral_numbers_are_integers_as_in_json_schema() -> None:
    assert validate_params({"min_size": 347.0, "upscale": 2}).min_size == 347


def test_unknown_preset() -> None:
    choices = "quality, fidelity, lightning, portrait"
    with pytest.raises(InvalidInput, match=f"preset='turbo' is unknown: choose one of {choices}"):
        validate_params({}, preset="turbo")


def test_params_are_json_round_trippable() -> None:
    p = validate_params({"seed": 5, "prompt": "a cat"}, preset="quality")
    assert RestoreParams.model_validate_json(p.model_dump_json()) == p
