"""Samplers against closed-form denoisers (no network): the update rules of spec §3."""

from __future__ import annotations

import math

import pytest
import torch

from supir_core.errors import Canceled
from supir_core.sampling import RestoreSettings, edm_step, noise_from, restore_dpmpp_2m, restore_edm, restore_edm_tiled
from supir_core.schedules import dpmpp_sigmas, karras_sigmas, legacy_ddpm_sigmas, sampling_sigmas

SIGMA_MAX = float(legacy_ddpm_sigmas()[-1])
NO_CHURN = RestoreSettings(s_churn=0.0)


def constant(target: torch.Tensor):
    return lambda x, sigma_hat, alpha: target.expand_as(x)


def test_euler_with_an_exact_denoiser_lands_on_its_answer() -> None:
    target = torch.randn(1, 4, 8, 8)
    out = restore_edm(
        constant(target), torch.randn(1, 4, 8, 8), sampling_sigmas(10), settings=NO_CHURN, sigma_max=SIGMA_MAX
    )
    torch.testing.assert_close(out, target)


def test_initial_noise_is_scaled_by_sqrt_one_plus_sigma_max_squared() -> None:
    seen = []
    noise = torch.randn(1, 4, 4, 4)

    def denoise(x, sigma_hat, alpha):
        seen.append(x.clone())
        return torch.zeros_like(x)

    restore_edm(denoise, noise, sampling_sigmas(3), settings=NO_CHURN, sigma_max=SIGMA_MAX)
    torch.testing.assert_close(seen[0], noise * math.sqrt(1 + SIGMA_MAX**2))


def test_churn_raises_sigma_and_adds_the_injected_noise() -> None:
    settings = RestoreSettings(s_churn=5.0, s_noise=1.01)
    sigmas = sampling_sigmas(50)
    x = torch.randn(1, 4, 4, 4)
    churn = torch.randn(1, 4, 4, 4)
    seen = {}

    def denoise(xc, sigma_hat, alpha):
        seen.update(x=xc.clone(), sigma_hat=sigma_hat)
        return torch.zeros_like(xc)

    gamma = settings.gamma(50)
    assert gamma == pytest.approx(0.1)
    edm_step(denoise, x, float(sigmas[0]), float(sigmas[1]), gamma=gamma, alpha=1.0, settings=settings,
             sigma_max=SIGMA_MAX, churn=churn, x_center=None)  # fmt: skip
    sigma_hat = float(sigmas[0]) * 1.1
    assert seen["sigma_hat"].item() == pytest.approx(sigma_hat)
    torch.testing.assert_close(seen["x"], x + 1.01 * churn * math.sqrt(sigma_hat**2 - float(sigmas[0]) ** 2))


def test_restoration_guidance_blends_towards_the_centre_on_the_pre_churn_sigma() -> None:
    settings = RestoreSettings(s_churn=5.0, restore_cfg=4.0)
    centre = torch.randn(1, 4, 4, 4)
    sigma, sigma_next = 3.0, 2.0
    _, info = edm_step(constant(torch.zeros(1, 4, 4, 4)), torch.randn(1, 4, 4, 4), sigma, sigma_next, gamma=0.1,
                       alpha=1.0, settings=settings, sigma_max=SIGMA_MAX, churn=None, x_center=centre)  # fmt: skip
    torch.testing.assert_close(info["denoised"], centre * (sigma / SIGMA_MAX) ** 4.0)
    # below the threshold the blend is off
    _, info = edm_step(constant(torch.zeros(1, 4, 4, 4)), torch.randn(1, 4, 4, 4), 0.1, 0.04, gamma=0.0,
                       alpha=1.0, settings=settings, sigma_max=SIGMA_MAX, churn=None, x_center=centre)  # fmt: skip
    assert torch.count_nonzero(info["denoised"]) == 0


def test_linear_control_scale_ramps_on_sigma() -> None:
    settings = RestoreSettings(use_linear_control_scale=True, control_scale_start=0.2, control_scale=0.9)
    assert settings.alpha(SIGMA_MAX, SIGMA_MAX) == pytest.approx(0.2)
    assert settings.alpha(0.0, SIGMA_MAX) == pytest.approx(0.9)
    assert RestoreSettings(control_scale=0.7).alpha(5.0, SIGMA_MAX) == 0.7


def test_recorded_noise_replays_exactly() -> None:
    noise = torch.randn(1, 4, 6, 6)
    churn = torch.randn(8, 1, 4, 6, 6)

    def denoise(x, sigma_hat, alpha):
        return 0.5 * x

    runs = [
        restore_edm(denoise, noise, sampling_sigmas(8), sigma_max=SIGMA_MAX, churn_noise=noise_from(churn))
        for _ in range(2)
    ]
    assert torch.equal(*runs)
    other = restore_edm(denoise, noise, sampling_sigmas(8), sigma_max=SIGMA_MAX, churn_noise=noise_from(churn * 2))
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


def test_tiled_sampler_with_a_pointwise_denoiser_equals_the_untiled_one() -> None:
    noise = torch.randn(1, 4, 20, 28)
    churn = torch.randn(6, 1, 4, 20, 28)

    def pointwise(x, sigma_hat, alpha):
        return torch.tanh(x) * 0.3

    full = restore_edm(pointwise, noise, sampling_sigmas(6), sigma_max=SIGMA_MAX, churn_noise=noise_from(churn))
    for batch in (1, 4):
        tiled = restore_edm_tiled(
            lambda x, s, a, w: pointwise(x, s, a),
            noise,
            sampling_sigmas(6),
            tile=8,
            stride=4,
            sigma_max=SIGMA_MAX,
            churn_noise=noise_from(churn),
            tiles_per_batch=batch,
        )
        torch.testing.assert_close(tiled, full, rtol=1e-5, atol=1e-5)


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
                           settings=RestoreSettings(s_noise=0.0), sigma_max=SIGMA_MAX)  # fmt: skip
    torch.testing.assert_close(out, target)


def official_dpmpp(denoise, noise, sigmas, legacy_sigma0, step_noise, s_noise, eta=1.0):
    """The official RestoreDPMPP2MSampler loop, transcribed in its own terms (t = −log σ, mult1…mult4, x_standard vs
    x_advanced, noise drawn only for i > 0 and σ_{i+1} > 0) for a batch-1 latent; returns x after each step."""
    x = noise * math.sqrt(1.0 + legacy_sigma0**2)
    old, out, draws = None, [], iter(step_noise)
    for i in range(len(sigmas) - 1):
        sigma, next_sigma = sigmas[i], sigmas[i + 1]
        eps = next(draws) if i > 0 and next_sigma > 1e-14 else None
        denoised = denoise(x, torch.full((1,), float(sigma)), 1.0)
        t, t_next = -torch.log(sigma), -torch.log(next_sigma)
        h = t_next - t
        mult1 = torch.exp(-t_next) / torch.exp(-t) * torch.exp(-eta * h)
        mult2 = torch.expm1(-h - eta * h)
        x_standard = mult1 * x - mult2 * denoised
        if old is None or next_sigma < 1e-14:
            x = x_standard
        else:
            r = (t - (-torch.log(sigmas[i - 1]))) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = mult1 * x - mult2 * denoised_d
            x = x + eps * next_sigma * torch.sqrt(-torch.expm1(-2 * eta * h)) * s_noise
        old = denoised
        out.append(x)
    return torch.stack(out)


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
    out = restore_dpmpp_2m(denoise, noise, sigmas, settings=RestoreSettings(s_noise=1.003), sigma_max=SIGMA_MAX,
                           init_sigma=SIGMA_MAX, step_noise=recorded, callback=steps.append)  # fmt: skip
    want = official_dpmpp(denoise, noise.double(), sigmas.double(), SIGMA_MAX, step_noise.double(), 1.003)
    torch.testing.assert_close(torch.stack([s["x"] for s in steps]).double(), want, rtol=1e-5, atol=1e-5)
    assert asked == list(range(num_steps - 2))
    torch.testing.assert_close(out, steps[-1]["denoised"])  # the last step returns D


def test_dpmpp_adds_no_noise_on_its_first_step() -> None:
    """A different noise level changes every step from the second one on, never the first."""
    noise = torch.randn(1, 4, 4, 4)

    def run(s_noise: float) -> list[torch.Tensor]:
        steps: list[dict] = []
        restore_dpmpp_2m(lambda x, s, a: 0.5 * x, noise, dpmpp_sigmas(5), settings=RestoreSettings(s_noise=s_noise),
                         sigma_max=SIGMA_MAX, step_noise=noise_from(torch.ones(3, 1, 4, 4, 4)),
                         callback=steps.append)  # fmt: skip
        return [s["x"] for s in steps]

    quiet, loud = run(0.0), run(1.0)
    torch.testing.assert_close(quiet[0], loud[0])
    assert all(not torch.allclose(q, lo) for q, lo in zip(quiet[1:4], loud[1:4], strict=True))


def test_dpmpp_ignores_guidance_unless_asked() -> None:
    settings = RestoreSettings(restore_cfg=4.0, use_linear_control_scale=True, control_scale=0.8, s_noise=0.0)
    centre = torch.ones(1, 4, 4, 4)
    alphas: list[float] = []

    def denoise(x, sigma_hat, alpha):
        alphas.append(alpha)
        return torch.zeros_like(x)

    plain = restore_dpmpp_2m(denoise, torch.randn(1, 4, 4, 4), dpmpp_sigmas(4), settings=settings,
                             sigma_max=SIGMA_MAX, x_center=centre)  # fmt: skip
    assert set(alphas) == {0.8} and torch.count_nonzero(plain) == 0
    alphas.clear()
    steps: list[dict] = []
    restore_dpmpp_2m(denoise, torch.randn(1, 4, 4, 4), dpmpp_sigmas(4), settings=settings, sigma_max=SIGMA_MAX,
                     x_center=centre, full_guidance=True, callback=steps.append)  # fmt: skip
    assert alphas[0] == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(steps[0]["denoised"], centre * (float(dpmpp_sigmas(4)[0]) / SIGMA_MAX) ** 4.0)


def test_a_tile_group_that_runs_out_of_memory_is_split() -> None:
    from supir_core.denoiser import Conditioning, Denoiser
    from supir_core.sampling import tiled_cfg

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
    kwargs = {"tile": 8, "stride": 4, "sigma_max": SIGMA_MAX, "settings": NO_CHURN}
    split = restore_edm_tiled(denoise, noise, sampling_sigmas(4), tiles_per_batch=0, **kwargs)
    assert max(batches) == 4
    assert failures == [48, 24, 12, 6]  # 24 windows × CFG 2, halved until 2 windows fit; later steps split first
    batches.clear()
    one_by_one = restore_edm_tiled(denoise, noise, sampling_sigmas(4), tiles_per_batch=1, **kwargs)
    assert set(batches) == {2}
    torch.testing.assert_close(split, one_by_one)
