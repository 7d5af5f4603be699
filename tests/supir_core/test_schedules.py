"""Legacy DDPM sigmas and the sampling grid (spec §3.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from supir_core.schedules import legacy_ddpm_sigmas, sampling_sigmas, sampling_timesteps


def test_training_sigmas_follow_the_scaled_linear_definition() -> None:
    sigmas = legacy_ddpm_sigmas()
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    np.testing.assert_allclose(sigmas.numpy(), np.sqrt((1 - alphas_cumprod) / alphas_cumprod), rtol=1e-6)
    assert sigmas.dtype == torch.float32
    assert bool((sigmas[1:] > sigmas[:-1]).all())
    assert sigmas[0].item() == pytest.approx(0.029167, abs=1e-6)
    assert sigmas[-1].item() == pytest.approx(14.614641, abs=1e-5)


def test_fifty_step_grid_matches_the_reference_values() -> None:
    assert sampling_timesteps(50)[:3].tolist() == [999, 979, 959]
    assert sampling_timesteps(50)[-2:].tolist() == [39, 19]
    sigmas = sampling_sigmas(50)
    assert len(sigmas) == 51 and sigmas[-1].item() == 0.0
    expected_head = [14.6146, 12.9663, 11.5428, 10.3094]
    expected_tail = [0.2482, 0.1963, 0.1345]
    assert sigmas[:4].tolist() == pytest.approx(expected_head, abs=1e-4)
    assert sigmas[-4:-1].tolist() == pytest.approx(expected_tail, abs=1e-4)


def test_eight_step_grid() -> None:
    expected = [14.6146, 7.2974, 4.0817, 2.4925, 1.6129, 1.0690, 0.6932, 0.3977, 0.0]
    assert sampling_sigmas(8).tolist() == pytest.approx(expected, abs=1e-4)


def test_step_count_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_steps"):
        sampling_timesteps(0)
