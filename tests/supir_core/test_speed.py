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


def _linear_control_run(model: torch.nn.Module, side: int = 16) -> tuple[torch.Tensor, list[int]]:
    """6 EDM steps with α ramping from 0 to 1 (a new control scale every step) on random conditioning: the latent,
    and the graphs torch.compile had built after each step."""
    from supir_core.denoiser import Conditioning, Denoiser
    from supir_core.guidance import RestoreSettings, sample
    from supir_core.params import validate_params
    from supir_core.speed import compile_counts

    spec = model.spec.unet
    gen = torch.Generator().manual_seed(0)

    def side_of_cfg() -> Conditioning:
        return Conditioning(
            torch.randn(1, 77, spec.context_dim, generator=gen),
            torch.randn(1, spec.adm_in_channels, generator=gen),
            torch.randn(1, 4, side, side, generator=gen),
        )

    cond, uncond = side_of_cfg(), side_of_cfg()
    noise = torch.randn(1, 4, side, side, generator=gen)
    settings = RestoreSettings.from_params(validate_params({"steps": 6, "linear_control_scale": True, "s_churn": 0}))
    graphs: list[int] = []
    with torch.inference_mode():
        latent = sample(
            settings, Denoiser(model.eps), noise, cond, uncond, x_center=cond.control,
            callback=lambda info: graphs.append(compile_counts()["graphs"]),
        )  # fmt: skip
    return latent, graphs


def test_full_graph_compile_has_no_graph_breaks_and_one_graph_serves_every_control_scale(fixture_a: Path) -> None:
    """compile="full" (fullgraph=True) fails on any graph break, so tracing the sampler through it proves none.
    α enters the graph as a tensor: a linear control scale (a new α each step) compiles nothing after step 1."""
    fixture = Fixture.open(fixture_a)
    torch._dynamo.reset()
    model = optimize(fixture.load_model(), SpeedSettings(compile="full", compile_backend="aot_eager"))
    rows = compare(fixture, run_fixture(fixture, model, only=["denoiser_cs1", "sampler_churn"]))
    assert rows and all(r.passed for r in rows), [(r.case, r.output, r.error) for r in rows if not r.passed]
    compiled, graphs = _linear_control_run(model)
    assert len(graphs) == 6 and graphs[1:] == [graphs[0]] * 5  # 0 recompiles after the first step
    eager, _ = _linear_control_run(fixture.load_model())
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_three_sizes_with_dynamic_compile_add_no_graphs_after_the_second(fixture_a: Path) -> None:
    """The worker's default (regional, compile_dynamic): the first size builds a graph per block shape, a second
    may add one more per function (measured: 15, then 1), later sizes none; nothing falls back to eager."""
    from supir_core.speed import compile_counts

    torch._dynamo.reset()  # graphs of equal blocks compiled by earlier tests in this process would serve these
    model = optimize(
        Fixture.open(fixture_a).load_model(),
        SpeedSettings(compile="regional", compile_backend="eager", compile_dynamic=True),
    )
    before = compile_counts()
    graphs = [_linear_control_run(model, side)[1][-1] - before["graphs"] for side in (16, 24, 32)]
    assert graphs[0] > 0 and graphs[1:] == [graphs[0]] * 2, graphs
    assert compile_counts()["eager_fallbacks"] == before["eager_fallbacks"]


@pytest.mark.parametrize(
    ("settings", "device", "message"),
    [
        (SpeedSettings(compile="regional", cuda_graphs=True), "cuda", "cuda_graphs needs compile=full"),
        (SpeedSettings(compile="none", cuda_graphs=True), "cuda", "cuda_graphs needs compile=full"),
        (SpeedSettings(compile="full", cuda_graphs=True, compile_backend="aot_eager"), "cuda", "inductor"),
        (SpeedSettings(compile="full", cuda_graphs=True), "cpu", "needs a CUDA device"),
        (SpeedSettings(fp8="compute"), "cuda", "fp8=compute needs compile"),
    ],
    ids=["regional_graphs", "eager_graphs", "graphs_backend", "graphs_on_cpu", "fp8_compute_eager"],
)
def test_settings_that_cannot_work_are_refused_at_start(settings: SpeedSettings, device: str, message: str) -> None:
    from supir_core.errors import SettingsError

    with pytest.raises(SettingsError, match=message):
        settings.check(torch.device(device))  # no CUDA call is needed to refuse these


def test_a_model_with_refused_settings_is_not_touched(fixture_a: Path) -> None:
    from supir_core.errors import SettingsError

    model = Fixture.open(fixture_a).load_model()
    with pytest.raises(SettingsError, match="cuda_graphs"):
        optimize(model, SpeedSettings(compile="regional", cuda_graphs=True, fuse_qkv=True))
    from diffusers.models.attention_processor import Attention

    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert attentions and not any(getattr(a, "fused_projections", False) for a in attentions)
    assert not model.whole_graph


def test_every_speed_setting_reaches_the_worker_and_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import fields

    from jobs.settings import Settings
    from supir_core.cli import build_parser

    names = {f.name for f in fields(SpeedSettings)} - {"compile_backend"}
    env = {"FP8": "compute", "COMPILE": "full", "CUDA_GRAPHS": "1", "OFFLOAD_TEXT": "1", "PROMPT_CACHE": "3",
           "CHANNELS_LAST": "1", "FUSE_QKV": "1", "COMPILE_DYNAMIC": "1",
           "COMPILE_CACHE_DIR": "/tmp/cache", "MEMORY_BUDGET_GB": "7.5", "PLAN_CACHE_DIR": "/tmp/plans"}  # fmt: skip
    assert {n.upper() for n in names} == set(env)
    for name, value in env.items():
        monkeypatch.setenv(f"SUPIR_{name}", value)
    worker = SpeedSettings.from_attributes(Settings())
    assert worker == SpeedSettings(
        channels_last=True, fuse_qkv=True, compile="full", cuda_graphs=True, compile_cache_dir=Path("/tmp/cache"),
        compile_dynamic=True, fp8="compute", offload_text=True, prompt_cache=3, memory_budget_gb=7.5,
        plan_cache_dir=Path("/tmp/plans"),
    )  # fmt: skip
    monkeypatch.setenv("XDG_CACHE_HOME", "/home/someone/.cache")
    args = build_parser().parse_args(
        ["restore", "x.png", "-o", "out", "--fp8", "compute", "--offload-text", "--memory-budget-gb", "3"]
    )
    plans = Path("/home/someone/.cache/supir/memory-plans")  # the user's cache: later runs skip the trace
    assert SpeedSettings.from_attributes(args) == SpeedSettings(
        fp8="compute", offload_text=True, memory_budget_gb=3.0, plan_cache_dir=plans
    )


def test_fp8_weights_carry_their_row_scales_without_a_bias_in_bf16() -> None:
    """Weight-only fp8 in bf16: the fp32 row scale is applied before the one rounding to bf16. Rounding the scale to
    bf16 first shifts each output channel by up to 0.4% (measured: 0.15% on average, against 0.05% here)."""
    from supir_core.speed import Fp8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 512, bias=False)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-3, 1, 512)[:, None])  # rows of many magnitudes: many scales
    layer = Fp8Linear(linear, compute=False)
    x = torch.randn(4096, 1024).bfloat16()
    expected = x.float() @ (layer.weight.float() * layer.weight_scale).t()  # the fp8 weights, scaled exactly
    got = layer(x).float()
    gain = (got * expected).sum(0) / (expected * expected).sum(0) - 1  # each channel's systematic error
    assert gain.abs().mean() < 8e-4 and gain.abs().max() < 3e-3, (gain.abs().mean(), gain.abs().max())
