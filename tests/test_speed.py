"""Speed settings keep the model SUPIR: each path stays within the conformance tolerances at tiny size."""

from __future__ import annotations

from pathlib import Path

import pytest

from supir_core.conformance import Fixture, compare, run_fixture
from supir_core.speed import SpeedSettings, optimize

CASES = ["denoiser_cs1", "sampler_churn", "sampler_tiled", "pipeline"]


@pytest.mark.parametrize(
    "settings",
    [
        SpeedSettings(channels_last=True),
        SpeedSettings(fuse_qkv=True),
        # aot_eager traces with dynamo and AOTAutograd like inductor does, without compiling kernels (fast on CI)
        SpeedSettings(compile="regional", compile_backend="aot_eager"),
    ],
    ids=["channels_last", "fuse_qkv", "regional_compile"],
)
def test_speed_settings_stay_within_tolerance(fixture_a: Path, settings: SpeedSettings) -> None:
    fixture = Fixture.open(fixture_a)
    model = optimize(fixture.load_model(), settings)
    rows = compare(fixture, run_fixture(fixture, model, only=CASES))
    assert rows and all(r.passed for r in rows), [(r.case, r.output, r.error) for r in rows if not r.passed]


def test_fused_projections_are_used(fixture_a: Path) -> None:
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    model = optimize(Fixture.open(fixture_a).load_model(), SpeedSettings(fuse_qkv=True))
    attentions = [m for net in (model.unet, model.adaptor) for m in net.modules() if isinstance(m, Attention)]
    assert attentions and all(isinstance(a.processor, FusedAttnProcessor2_0) for a in attentions)
    assert all(getattr(a, "fused_projections", False) for a in attentions)
