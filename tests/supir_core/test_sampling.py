"""Samplers against closed-form denoisers (no network): the update rules of spec §3."""

from __future__ import annotations

import math

import pytest
import torch

from supir_core.errors import Canceled
from supir_core.sampling import (
    churn_gamma,
    control_scale_at,
    edm_step,
    noise_from,
    restore_dpmpp_2m,
    restore_edm,
    restore_edm_tiled,
)
from supir_core.schedules import dpmpp_sigmas, karras_sigmas, legacy_ddpm_sigmas, sampling_sigmas
from tests.supir_core.official import official_dpmpp

SIGMA_MAX = float(legacy_ddpm_sigmas()[-1])


def constant(target: torch.Tensor):
    return lambda x, sigma_hat, alpha: target.expand_as(x)


def test_euler_with_an_exact_denoiser_lands_on_its_answer() -> None:
    target = torch.randn(1, 4, 8, 8)
    out = restore_edm(constant(target), torch.randn(1, 4, 8, 8), sampling_sigmas(10), sigma_max=SIGMA_MAX)
    torch.testing.assert_close(out, target)


def test_initial_noise_is_scaled_by_sqrt_one_plus_sigma_max_squared() -> None:
    seen = []
    noise = torch.randn(1, 4, 4, 4)

    def denoise(x, sigma_hat, alpha):
        seen.append(x.clone())
        return torch.zeros_like(x)

    restore_edm(denoise, noise, sampling_sigmas(3), sigma_max=SIGMA_MAX)
    torch.testing.assert_close(seen[0], noise * math.sqrt(1 + SIGMA_MAX**2))


def test_churn_raises_sigma_and_adds_the_injected_noise() -> None:
    sigmas = sampling_sigmas(50)
    x = torch.randn(1, 4, 4, 4)
    churn = torch.randn(1, 4, 4, 4)
    seen = {}

    def denoise(xc, sigma_hat, alpha):
        seen.update(x=xc.clone(), sigma_hat=sigma_hat)
        return torch.zeros_like(xc)

    gamma = churn_gamma(5.0, 50)
    assert gamma == pytest.approx(0.1)
    edm_step(denoise, x, float(sigmas[0]), float(sigmas[1]), gamma=gamma, alpha=1.0, s_noise=1.01,
             restoration_scale=-1.0, sigma_max=SIGMA_MAX, xi=churn, x_center=None)  # fmt: skip
    sigma_hat = float(sigmas[0]) * 1.1
    assert seen["sigma_hat"].item() == pytest.approx(sigma_hat)
    torch.testing.assert_close(seen["x"], x + 1.01 * churn * math.sqrt(sigma_hat**2 - float(sigmas[0]) ** 2))


def test_restoration_guidance_blends_towards_the_centre_on_the_pre_churn_sigma() -> None:
    guidance = {"s_noise": 1.01, "restoration_scale": 4.0, "sigma_max": SIGMA_MAX, "xi": None}
    centre = torch.randn(1, 4, 4, 4)
    sigma, sigma_next = 3.0, 2.0
    _, info = edm_step(constant(torch.zeros(1, 4, 4, 4)), torch.randn(1, 4, 4, 4), sigma, sigma_next, gamma=0.1,
                       alpha=1.0, x_center=centre, **guidance)  # fmt: skip
    torch.testing.assert_close(info["denoised"], centre * (sigma / SIGMA_MAX) ** 4.0)
    # below the threshold the blend is off
    _, info = edm_step(constant(torch.zeros(1, 4, 4, 4)), torch.randn(1, 4, 4, 4), 0.1, 0.04, gamma=0.0,
                       alpha=1.0, x_center=centre, **guidance)  # fmt: skip
    assert torch.count_nonzero(info["denoised"]) == 0


def test_linear_control_scale_ramps_on_sigma() -> None:
    ramp = {"control_scale": 0.9, "control_scale_start": 0.2, "linear_control_scale": True}
    assert control_scale_at(SIGMA_MAX, SIGMA_MAX, **ramp) == pytest.approx(0.2)
    assert control_scale_at(0.0, SIGMA_MAX, **ramp) == pytest.approx(0.9)
    assert control_scale_at(5.0, SIGMA_MAX, **ramp | {"control_scale": 0.7, "linear_control_scale": False}) == 0.7


def test_recorded_noise_replays_exactly() -> None:
    noise = torch.randn(1, 4, 6, 6)
    churn = torch.randn(8, 1, 4, 6, 6)

    def denoise(x, sigma_hat, alpha):
        return 0.5 * x

    def run(recorded: torch.Tensor) -> torch.Tensor:
        return restore_edm(
            denoise, noise, sampling_sigmas(8), sigma_max=SIGMA_MAX, s_churn=5.0, step_noise=noise_from(recorded)
        )

    runs = [run(churn) for _ in range(2)]
    assert torch.equal(*runs)
    other = run(churn * 2)
    assert not torch.equal(runs[0], other)


def test_cancel_stops_before_the_next_step() -> None:
    calls = []

    def denoise(x, sigma_hat, alpha):
        calls.append(1)
        return torch.zeros_like(x)

    with pytest.raises(Canceled, match="step 3 of 10"):
        restore_edm(denoise, torch.randn(1, 4, 4, 4), sampling_sigmas(10), sigma_max=SIGMA_MAX,
                    should_stop=lambda: len(calls) >= 2)  # fmt: skip
    assert len(calls) == 2


def mixing(x: torch.Tensor, sigma_hat: torch.Tensor, alpha: float) -> torch.Tensor:
    """A denoiser whose output at a pixel depends on its neighbours (3×3 mean) and on the whole input (its mean per
    channel), on σ̂ and on α: each tile gives its own value at a pixel, so windows and blend weights all show."""
    near = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    whole = x.mean(dim=(-2, -1), keepdim=True)
    return alpha * 0.3 * torch.tanh(near) + 0.5 * whole + 0.1 * x / (1.0 + sigma_hat[:, None, None, None])


def official_tiled(denoise, noise, sigmas, tile, stride, churn, s_churn, s_noise):
    """FORMAT.md §4.2 written out on its own: row-major windows with a flush last row / column, weights
    g(y; T/2)·g(x; (T−1)/2) in float64, one §4.1 Euler step (churn, no guidance) per window on its crops,
    x = Σ y·W / Σ W in float32."""

    def starts(length: int) -> list[int]:
        found = list(range(0, length - tile + 1, stride))
        return [*found, length - tile] if (length - tile) % stride else found

    u = torch.arange(tile, dtype=torch.float64)

    def g(m: float) -> torch.Tensor:
        return torch.exp(-((u - m) ** 2) / (2 * 0.01 * tile**2)) / math.sqrt(2 * math.pi * 0.01)

    weight = g(tile / 2)[:, None] * g((tile - 1) / 2)[None, :]
    steps = len(sigmas) - 1
    gamma = min(s_churn / steps, math.sqrt(2) - 1)
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        sigma_hat = sigma * (1 + gamma)
        acc, cnt = torch.zeros_like(x), torch.zeros_like(x)
        for h in starts(x.shape[-2]):
            for w in starts(x.shape[-1]):
                crop = (..., slice(h, h + tile), slice(w, w + tile))
                xc = x[crop] + s_noise * churn[i][crop] * math.sqrt(sigma_hat**2 - sigma**2)
                d = denoise(xc, torch.full((xc.shape[0],), sigma_hat), 1.0)
                acc[crop] += (xc + (sigma_next - sigma_hat) * (xc - d) / sigma_hat) * weight
                cnt[crop] += weight
        x = acc / cnt
    return x


def test_tiled_sampler_follows_format_4_2_with_a_denoiser_that_mixes_neighbours() -> None:
    """Against FORMAT §4.2 written out, whatever the tile groups; a wrong window, weight or blend changes the result
    (tiles and the untiled run differ here by ~0.8; off-centre vs centred weights by ~0.4)."""
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(2, 4, 22, 30, generator=gen)  # (22 − 8) and (30 − 8) not multiples of 4: flush windows
    churn = torch.randn(6, 2, 4, 22, 30, generator=gen)
    sigmas = sampling_sigmas(6)
    want = official_tiled(mixing, noise, sigmas, 8, 4, churn, s_churn=2.0, s_noise=1.01)
    for batch in (1, 4, 0):
        tiled = restore_edm_tiled(
            lambda x, s, a, w: mixing(x, s, a),
            noise,
            sigmas,
            tile=8,
            stride=4,
            sigma_max=SIGMA_MAX,
            s_churn=2.0,
            s_noise=1.01,
            step_noise=noise_from(churn),
            tiles_per_batch=batch,
        )
        torch.testing.assert_close(tiled, want, rtol=1e-5, atol=1e-5)
    untiled = restore_edm(mixing, noise, sigmas, sigma_max=SIGMA_MAX, s_churn=2.0, s_noise=1.01,
                          step_noise=noise_from(churn))  # fmt: skip
    assert (untiled - want).abs().max() > 1e-2  # the tiles' borders matter to this denoiser


def test_one_tile_over_the_whole_latent_is_the_untiled_sampler() -> None:
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 4, 16, 16, generator=gen)
    churn = torch.randn(5, 1, 4, 16, 16, generator=gen)
    run = {"sigma_max": SIGMA_MAX, "s_churn": 2.0, "s_noise": 1.01, "step_noise": noise_from(churn)}
    untiled = restore_edm(mixing, noise, sampling_sigmas(5), **run)
    tiled = restore_edm_tiled(lambda x, s, a, w: mixing(x, s, a), noise, sampling_sigmas(5), tile=16, stride=8, **run)
    torch.testing.assert_close(tiled, untiled, rtol=1e-6, atol=1e-6)


def test_karras_sigmas() -> None:
    sigmas = karras_sigmas(8, 0.4, 14.6)
    assert sigmas[0].item() == pytest.approx(14.6) and sigmas[-2].item() == pytest.approx(0.4) and sigmas[-1] == 0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    grid = dpmpp_sigmas(8)
    assert grid[0].item() == pytest.approx(SIGMA_MAX, rel=1e-5)
    assert grid[-2].item() == pytest.approx(float(sampling_sigmas(8)[-2]), rel=1e-5)


def test_dpmpp_with_an_exact_denoiser_and_no_noise_lands_on_its_answer() -> None:
    target = torch.randn(1, 4, 8, 8)
    out = restore_dpmpp_2m(constant(target), torch.randn(1, 4, 8, 8), dpmpp_sigmas(8),
                           s_noise=0.0, sigma_max=SIGMA_MAX)  # fmt: skip
    torch.testing.assert_close(out, target)


@pytest.mark.parametrize("num_steps", [2, 3, 8])
def test_dpmpp_follows_the_official_update_step_by_step(num_steps: int) -> None:
    """Against the official loop on a nonlinear denoiser: no noise on step 0, N − 2 draws, D on the last step."""
    gen = torch.Generator().manual_seed(num_steps)
    target = torch.randn(1, 4, 6, 6, generator=gen)
    noise = torch.randn(1, 4, 6, 6, generator=gen)
    step_noise = torch.randn(max(num_steps - 2, 0), 1, 4, 6, 6, generator=gen)

    def denoise(x, sigma, alpha):  # depends on x and σ, so every coefficient matters
        return torch.tanh(0.3 * x) + target * (1.0 / (1.0 + sigma[:, None, None, None]))

    sigmas = dpmpp_sigmas(num_steps)
    asked: list[int] = []

    def recorded(i: int, like: torch.Tensor) -> torch.Tensor:
        asked.append(i)
        return step_noise[i]

    steps: list[dict] = []
    out = restore_dpmpp_2m(denoise, noise, sigmas, s_noise=1.003, sigma_max=SIGMA_MAX, init_sigma=SIGMA_MAX,
                           step_noise=recorded, callback=steps.append)  # fmt: skip
    want = official_dpmpp(denoise, noise.double(), sigmas.double(), SIGMA_MAX, step_noise.double(), 1.003)
    torch.testing.assert_close(torch.stack([s["x"] for s in steps]).double(), want, rtol=1e-5, atol=1e-5)
    assert asked == list(range(num_steps - 2))
    torch.testing.assert_close(out, steps[-1]["denoised"])  # the last step returns D


def test_dpmpp_adds_no_noise_on_its_first_step() -> None:
    """A different noise level changes every step from the second one on, never the first."""
    noise = torch.randn(1, 4, 4, 4)

    def run(s_noise: float) -> list[torch.Tensor]:
        steps: list[dict] = []
        restore_dpmpp_2m(lambda x, s, a: 0.5 * x, noise, dpmpp_sigmas(5), s_noise=s_noise, sigma_max=SIGMA_MAX,
                         step_noise=noise_from(torch.ones(3, 1, 4, 4, 4)), callback=steps.append)  # fmt: skip
        return [s["x"] for s in steps]

    quiet, loud = run(0.0), run(1.0)
    torch.testing.assert_close(quiet[0], loud[0])
    assert all(not torch.allclose(q, lo) for q, lo in zip(quiet[1:4], loud[1:4], strict=True))


def test_dpmpp_ignores_guidance_unless_asked() -> None:
    """The official DPM++ sampler swallows restoration guidance and the control ramp: passing them changes no step
    of a run whose denoiser depends on x, σ and α; full_guidance applies both, on σ_i."""
    gen = torch.Generator().manual_seed(6)
    noise, centre = torch.randn(1, 4, 4, 4, generator=gen), torch.randn(1, 4, 4, 4, generator=gen)
    recorded = noise_from(torch.randn(2, 1, 4, 4, 4, generator=gen))
    guidance = {"restoration_scale": 4.0, "linear_control_scale": True, "control_scale_start": 0.2}
    alphas: list[float] = []

    def denoise(x, sigma, alpha):
        alphas.append(alpha)
        return alpha * torch.tanh(0.3 * x) + 0.1 * x / (1.0 + sigma[:, None, None, None])

    def run(**extra) -> list[dict]:
        steps: list[dict] = []
        restore_dpmpp_2m(denoise, noise, dpmpp_sigmas(4), sigma_max=SIGMA_MAX, control_scale=0.8, s_noise=1.003,
                         x_center=centre, step_noise=recorded, callback=steps.append, **extra)  # fmt: skip
        return steps

    plain = run()
    alphas.clear()
    ignored = run(**guidance)
    assert set(alphas) == {0.8}
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(plain, ignored, strict=True))
    alphas.clear()
    full = run(**guidance, full_guidance=True)
    assert alphas[0] == pytest.approx(0.2, abs=1e-5) and alphas[-1] > alphas[0]
    d_cfg, sigma = full[0]["denoised_cfg"], float(dpmpp_sigmas(4)[0])
    torch.testing.assert_close(full[0]["denoised"], d_cfg - (d_cfg - centre) * (sigma / SIGMA_MAX) ** 4.0)
    assert not torch.allclose(full[-1]["x"], plain[-1]["x"], atol=1e-3)


def test_a_tile_group_that_runs_out_of_memory_is_split() -> None:
    from supir_core.denoiser import Conditioning, Denoiser
    from supir_core.guidance import tiled_cfg

    batches: list[int] = []
    failures: list[int] = []

    def network(x, t, context, vector, hint, control_scale=1.0):
        if x.shape[0] > 4:  # more than two tiles (×2 for CFG) "does not fit"
            failures.append(x.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        batches.append(x.shape[0])
        return torch.tanh(x)

    cond = Conditioning(torch.zeros(1, 77, 8), torch.zeros(1, 16), torch.zeros(1, 4, 20, 28))
    noise = torch.randn(1, 4, 20, 28)
    denoise = tiled_cfg(Denoiser(network), cond, cond, 2.0, 4.0)
    kwargs = {"tile": 8, "stride": 4, "sigma_max": SIGMA_MAX}
    split = restore_edm_tiled(denoise, noise, sampling_sigmas(4), tiles_per_batch=0, **kwargs)
    assert max(batches) == 4
    assert failures == [48, 24, 12, 6]  # 24 windows × CFG 2, halved until 2 windows fit; later steps split first
    batches.clear()
    one_by_one = restore_edm_tiled(denoise, noise, sampling_sigmas(4), tiles_per_batch=1, **kwargs)
    assert set(batches) == {2}
    torch.testing.assert_close(split, one_by_one)


def test_settings_take_every_field_from_the_public_parameters() -> None:
    """RestoreSettings speaks RestoreParams' names: each field but the two official constants is a parameter, and
    from_params copies each (every value below differs from its default, so a field left out would show)."""
    from dataclasses import fields

    from supir_core.guidance import RestoreSettings
    from supir_core.params import RestoreParams, validate_params

    public = {f.name for f in fields(RestoreSettings)} - {"restoration_min_sigma", "eta"}
    assert public <= set(RestoreParams.model_fields)
    params = validate_params(
        {"sampler": "dpmpp_2m", "steps": 7, "cfg_scale": 5.5, "cfg_scale_start": 2.5, "linear_cfg": False,
         "control_scale": 0.6, "control_scale_start": 0.3, "linear_control_scale": True, "restoration_scale": 3.0,
         "s_churn": 1.5, "s_noise": 1.002, "dpmpp_full_guidance": True, "tile_size": 64, "tile_stride": 48,
         "tiles_per_batch": 3, "centered_tile_weights": True}
    )  # fmt: skip
    assert all(getattr(params, name) != getattr(RestoreParams(), name) for name in public)
    settings = RestoreSettings.from_params(params)
    assert {n: getattr(settings, n) for n in public} == {n: getattr(params, n) for n in public}
    assert settings.cfg_scale_at_start == 5.5  # linear_cfg off: constant guidance
    assert settings.tile((40, 30)) == (30, 30) and settings.tile((80, 90)) == (64, 48)
