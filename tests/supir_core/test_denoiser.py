"""The denoiser against closed-form networks: σ snapping, input scaling, D = x − σ_q·ε."""

from __future__ import annotations

import torch

from supir_core.denoiser import Conditioning, Denoiser
from supir_core.schedules import legacy_ddpm_sigmas


def cond(batch: int = 2) -> Conditioning:
    return Conditioning(torch.zeros(batch, 77, 8), torch.zeros(batch, 16), torch.zeros(batch, 4, 4, 4))


def test_sigma_is_snapped_to_the_nearest_training_sigma() -> None:
    grid = legacy_ddpm_sigmas()
    denoiser = Denoiser(lambda *a, **k: None)  # type: ignore[arg-type,return-value]
    t, sigma_q = denoiser.quantize(torch.tensor([grid[500].item() * 1.0001, 100.0, 0.0]))
    assert t.tolist() == [500, 999, 0]
    assert torch.equal(sigma_q, grid[t])


def test_network_sees_the_scaled_input_and_the_integer_timestep() -> None:
    seen = {}

    def network(x, timesteps, context, vector, hint, control_scale=1.0):
        seen.update(x=x, t=timesteps, scale=control_scale)
        return torch.ones_like(x)

    x = torch.randn(2, 4, 4, 4)
    sigma = torch.tensor([3.0, 0.5])
    out = Denoiser(network).run(x, sigma, cond(), control_scale=0.25)
    sigma_q = out.sigma_quantized[:, None, None, None]
    torch.testing.assert_close(seen["x"], x / (sigma_q**2 + 1).sqrt())
    assert seen["t"].dtype == torch.int64 and torch.equal(seen["t"], out.timestep)
    assert seen["scale"] == 0.25
    torch.testing.assert_close(out.denoised, x - sigma_q)


def test_a_perfect_eps_network_recovers_the_clean_latent() -> None:
    clean = torch.randn(1, 4, 4, 4)
    noise = torch.randn(1, 4, 4, 4)
    grid = legacy_ddpm_sigmas()
    sigma = grid[700:701]
    denoiser = Denoiser(lambda x, *a, **k: noise)
    torch.testing.assert_close(denoiser(clean + sigma * noise, sigma, cond(1)), clean)
