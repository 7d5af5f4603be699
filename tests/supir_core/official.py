"""The official samplers' loops, transcribed in their own terms, to test ours against."""

import math

import torch


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
