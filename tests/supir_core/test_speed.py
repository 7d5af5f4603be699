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
        SpeedSettings(compile="regional", compile_backend="aot_eager", compile_dynamic=True),
    ],
    ids=["channels_last", "fuse_qkv", "regional_compile", "regional_compile_dynamic"],
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


@pytest.mark.parametrize("fp8", ["weights", "compute"])
def test_fp8_stays_within_its_tolerance(fixture_a: Path, fp8: str) -> None:
    fixture = Fixture.open(fixture_a)
    model = optimize(fixture.load_model(), SpeedSettings(fp8=fp8, fuse_qkv=True))  # type: ignore[arg-type]
    rows = compare(fixture, run_fixture(fixture, model, only=CASES))
    assert rows and all(r.error <= FP8_TOLERANCE for r in rows), [(r.case, r.output, r.error) for r in rows]
    assert not all(r.passed for r in rows)  # the numbers really are rounded: float8 is not exact


def test_fp8_weights_halve_the_linear_layers(fixture_a: Path) -> None:
    from supir_core.speed import Fp8Linear

    model = Fixture.open(fixture_a).load_model()
    linears = [m for net in (model.unet, model.adaptor) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    fp32_bytes, rows = sum(m.weight.numel() * 4 for m in linears), sum(m.weight.shape[0] for m in linears)
    before = weight_bytes(model.unet) + weight_bytes(model.adaptor)
    optimize(model, SpeedSettings(fp8="weights"))
    layers = [m for net in (model.unet, model.adaptor) for m in net.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == len(linears) and all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    saved = before - (weight_bytes(model.unet) + weight_bytes(model.adaptor))
    assert saved == fp32_bytes * 3 // 4 - rows * 4  # 1 byte per weight instead of 4, plus an fp32 scale per row


def test_fp8_compute_runs_the_transformer_blocks_in_float8(fixture_a: Path) -> None:
    from diffusers.models.attention import BasicTransformerBlock

    from supir_core.speed import Fp8Linear

    model = optimize(Fixture.open(fixture_a).load_model(), SpeedSettings(fp8="compute"))
    blocks = [b for net in (model.unet, model.adaptor) for b in net.modules() if isinstance(b, BasicTransformerBlock)]
    assert blocks and not [m for b in blocks for m in b.modules() if type(m) is torch.nn.Linear]
    layers = [m for b in blocks for m in b.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 10 * len(blocks)  # q, k, v, out × 2 attentions, GEGLU in, feed-forward out
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    assert type(model.adaptor.time_embedding.linear_1) is torch.nn.Linear  # embeddings stay exact


def test_fp8_linear_matches_a_float8_reference() -> None:
    """Fp8Linear = (x rounded to e4m3 per row) · (W rounded per row)ᵀ + b, scales undone: checked by hand."""
    from supir_core.speed import E4M3_MAX, Fp8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(2, 5, 64) * torch.logspace(-2, 2, 64)  # a wide range of magnitudes
    w_scale = linear.weight.abs().amax(1, keepdim=True) / E4M3_MAX
    x_scale = x.abs().amax(-1, keepdim=True) / E4M3_MAX
    w8 = (linear.weight / w_scale).to(torch.float8_e4m3fn).float() * w_scale
    x8 = (x / x_scale).to(torch.float8_e4m3fn).float() * x_scale
    expected = x8 @ w8.t() + linear.bias
    got = Fp8Linear(linear, compute=True)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    exact = linear(x)
    assert 0.005 < ((got - exact).norm() / exact.norm()).item() < 0.1  # rounded, yet close
    weights_only = Fp8Linear(linear, compute=False)(x)
    torch.testing.assert_close(weights_only, x @ w8.t() + linear.bias, rtol=1e-5, atol=1e-4)


def test_full_graph_compile_has_no_graph_breaks(fixture_a: Path) -> None:
    """compile="full" (fullgraph=True) fails on any graph break, so tracing the sampler through it proves none."""
    fixture = Fixture.open(fixture_a)
    model = optimize(fixture.load_model(), SpeedSettings(compile="full", compile_backend="aot_eager"))
    rows = compare(fixture, run_fixture(fixture, model, only=["denoiser_cs1", "sampler_churn"]))
    assert rows and all(r.passed for r in rows), [(r.case, r.output, r.error) for r in rows if not r.passed]


def test_every_speed_setting_reaches_the_worker_and_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import fields

    from jobs.settings import Settings
    from supir_core.cli import build_parser

    names = {f.name for f in fields(SpeedSettings)} - {"compile_backend"}
    env = {"FP8": "compute", "COMPILE": "full", "CUDA_GRAPHS": "1", "OFFLOAD_TEXT": "1", "PROMPT_CACHE": "3",
           "CHANNELS_LAST": "1", "FUSE_QKV": "1", "COMPILE_DYNAMIC": "1",
           "COMPILE_CACHE_DIR": "/tmp/cache", "MEMORY_BUDGET_GB": "7.5"}  # fmt: skip
    assert {n.upper() for n in names} == set(env)
    for name, value in env.items():
        monkeypatch.setenv(f"SUPIR_{name}", value)
    worker = SpeedSettings.from_attributes(Settings())
    assert worker == SpeedSettings(
        channels_last=True, fuse_qkv=True, compile="full", cuda_graphs=True, compile_cache_dir=Path("/tmp/cache"),
        compile_dynamic=True, fp8="compute", offload_text=True, prompt_cache=3, memory_budget_gb=7.5,
    )  # fmt: skip
    args = build_parser().parse_args(
        ["restore", "x.png", "-o", "out", "--fp8", "compute", "--offload-text", "--memory-budget-gb", "3"]
    )
    assert SpeedSettings.from_attributes(args) == SpeedSettings(fp8="compute", offload_text=True, memory_budget_gb=3.0)
