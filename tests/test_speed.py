"""Speed settings keep the model SUPIR: each path stays within the conformance tolerances at tiny size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from supir_core.conformance import Fixture, compare, run_fixture
from supir_core.speed import SpeedSettings, optimize, weight_bytes

CASES = ["denoiser_cs1", "sampler_churn", "sampler_tiled", "pipeline"]
# float8 weights round each weight to 3 mantissa bits (±3.6% rms per weight); through the tiny fixture's random
# networks that gives 2–8% relative L2 on network outputs and sampled latents. A broken path is off by ~100%.
FP8_TOLERANCE = 0.1


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


def test_fused_projections_are_used_and_the_unfused_dropped(fixture_a: Path) -> None:
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    model = Fixture.open(fixture_a).load_model()
    before = weight_bytes(model.unet) + weight_bytes(model.adaptor)
    optimize(model, SpeedSettings(fuse_qkv=True))
    attentions = [m for net in (model.unet, model.adaptor) for m in net.modules() if isinstance(m, Attention)]
    assert attentions and all(isinstance(a.processor, FusedAttnProcessor2_0) for a in attentions)
    assert all(getattr(a, "fused_projections", False) for a in attentions)
    assert weight_bytes(model.unet) + weight_bytes(model.adaptor) == before  # fusing costs no memory


def test_fp8_weights_stay_within_their_tolerance(fixture_a: Path) -> None:
    fixture = Fixture.open(fixture_a)
    model = optimize(fixture.load_model(), SpeedSettings(fp8_weights=True, fuse_qkv=True))
    rows = compare(fixture, run_fixture(fixture, model, only=CASES))
    assert rows and all(r.error <= FP8_TOLERANCE for r in rows), [(r.case, r.output, r.error) for r in rows]
    assert not all(r.passed for r in rows)  # the weights really are rounded: float8 is not exact


def test_fp8_weights_halve_the_linear_layers(fixture_a: Path) -> None:
    model = Fixture.open(fixture_a).load_model()
    linears = [m for net in (model.unet, model.adaptor) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    fp32_bytes = sum(m.weight.numel() * 4 for m in linears)
    before = weight_bytes(model.unet) + weight_bytes(model.adaptor)
    optimize(model, SpeedSettings(fp8_weights=True))
    assert all(getattr(m.weight, "qdata", m.weight).dtype == torch.float8_e4m3fn for m in linears)
    saved = before - (weight_bytes(model.unet) + weight_bytes(model.adaptor))
    # 1 byte per weight instead of 4, plus one fp32 scale per output row
    assert saved == pytest.approx(fp32_bytes * 3 / 4, rel=0.05)


def test_full_graph_compile_has_no_graph_breaks(fixture_a: Path) -> None:
    """compile="full" (fullgraph=True) fails on any graph break, so tracing the sampler through it proves none."""
    fixture = Fixture.open(fixture_a)
    model = optimize(fixture.load_model(), SpeedSettings(compile="full", compile_backend="aot_eager"))
    rows = compare(fixture, run_fixture(fixture, model, only=["denoiser_cs1", "sampler_churn"]))
    assert rows and all(r.passed for r in rows), [(r.case, r.output, r.error) for r in rows if not r.passed]
