"""The k-diffusion samplers' sigma table against independent formulas and diffusers.

The stand-in alpha_bar = 2^-24 (sigma ~ 4096) is for alpha_bar = 0 only (zero terminal SNR, rectified flow at
s = 1), as diffusers' ``rescale_betas_zero_snr``. A schedule whose last alpha_bar is small but positive (the
clipped cosine schedule: alpha_bar_{T-1} ~ 2.4e-9, sigma_{T-1} ~ 20291) keeps its own sigma, so the sampler's
x = x_t / sqrt(alpha_bar) and the network's time input name the same noise level.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.diffusion import DDIMSampler, EulerAncestralSampler, EulerSampler, GaussianDiffusion, RectifiedFlow
from ldm.diffusion.k_samplers import MIN_ALPHA_BAR, discrete_sigmas


def toy_model(x, t):  # a non-linear network
    return 0.3 * x + 0.1 * torch.sin(3 * x) * (t.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype) / 1000)


def test_discrete_sigmas_are_the_training_sigmas_of_the_cosine_schedule():
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) at every t of the clipped cosine schedule (Nichol & Dhariwal
    2021 eq. 17, betas clipped at 0.999): its last sigma is ~20291, not the zero-terminal-SNR stand-in 4096."""
    T, s = 1000, 0.008

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    ab = np.cumprod(1 - betas)
    sigmas = discrete_sigmas(GaussianDiffusion(schedule="cosine", prediction="v"))
    np.testing.assert_allclose(sigmas, np.sqrt((1 - ab) / ab), rtol=1e-9)
    assert sigmas[-1] == pytest.approx(20291.17, rel=1e-5)


@pytest.mark.parametrize("process", ["zero_terminal_snr", "rectified_flow"])
def test_alpha_bar_zero_still_becomes_two_to_the_minus_24(process):
    diffusion = (
        GaussianDiffusion(prediction="v", zero_terminal_snr=True)
        if process == "zero_terminal_snr"
        else RectifiedFlow()
    )
    sigmas = discrete_sigmas(diffusion)
    assert float(diffusion.alphas_cumprod[-1]) == 0.0
    assert sigmas[-1] == pytest.approx(math.sqrt((1 - MIN_ALPHA_BAR) / MIN_ALPHA_BAR), rel=1e-12)
    assert all(math.isfinite(v) for v in sigmas)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_euler_is_ddim_on_the_cosine_schedule(prediction, spacing):
    """Euler (and Euler-ancestral with eta = 1) on the same timesteps is DDIM (eta = 0 / 1) on every schedule,
    including from t = T - 1 of the cosine schedule (both spacings start there)."""
    diffusion = GaussianDiffusion(schedule="cosine", prediction=prediction)
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ddim = DDIMSampler(13, timestep_spacing=spacing)(toy_model, diffusion, x_T)
    euler = EulerSampler(13, timestep_spacing=spacing)(toy_model, diffusion, x_T)
    scale = ddim.abs().max().item()  # an eps network's x0 is ~ x_T / sqrt(alpha_bar_{T-1}): large here
    torch.testing.assert_close(euler, ddim, rtol=0, atol=1e-10 * max(scale, 1.0))
    ancestral = EulerAncestralSampler(13, timestep_spacing=spacing)(
        toy_model, diffusion, x_T, generator=torch.Generator().manual_seed(3)
    )
    ddim1 = DDIMSampler(13, eta=1.0, timestep_spacing=spacing)(
        toy_model, diffusion, x_T, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(ancestral, ddim1, rtol=0, atol=1e-10 * max(ddim1.abs().max().item(), 1.0))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_euler_matches_a_float64_reference_on_the_cosine_schedule(prediction):
    """k-diffusion's Euler written out (Karras et al. 2022, Algorithm 1 without the correction) on the cosine
    schedule's own sigmas: x = x_T sqrt(1 + sigma_0^2), D from the network at x / sqrt(1 + sigma^2),
    x' = D + (sigma' / sigma)(x - D)."""
    diffusion = GaussianDiffusion(schedule="cosine", prediction=prediction)
    ab = diffusion.alphas_cumprod.numpy()
    sampler = EulerSampler(13, timestep_spacing="trailing")
    timesteps = sampler.timesteps(diffusion)
    assert timesteps[0] == 999
    sigmas = [math.sqrt((1 - ab[t]) / ab[t]) for t in timesteps] + [0.0]
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x_T * math.sqrt(1 + sigmas[0] ** 2)
    for i, t in enumerate(timesteps):
        x_in = x / math.sqrt(1 + sigmas[i] ** 2)
        out = toy_model(x_in, torch.full((3,), t, dtype=torch.long))
        a, s = math.sqrt(ab[t]), math.sqrt(1 - ab[t])
        denoised = {"eps": (x_in - s * out) / a, "v": a * x_in - s * out, "x0": out}[prediction]
        x = denoised + sigmas[i + 1] / sigmas[i] * (x - denoised)
    ours = sampler(toy_model, diffusion, x_T)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-12 * max(x.abs().max().item(), 1.0))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_euler_matches_diffusers_on_the_cosine_schedule(prediction):
    """diffusers' EulerDiscreteScheduler on "squaredcos_cap_v2" (the same clipped cosine betas) starts at its own
    sigma_{T-1} ~ 20291; it runs in float32 (its sigma_{T-1} is 20291.30), hence the tolerance."""
    diffusers = pytest.importorskip("diffusers")
    diffusion = GaussianDiffusion(schedule="cosine", prediction=prediction)
    scheduler = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(13)
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = toy_model(scheduler.scale_model_input(x, t), torch.full((3,), int(t), dtype=torch.long))
        x = scheduler.step(out, t, x).prev_sample
    ours = EulerSampler(13, timestep_spacing="trailing")(toy_model, diffusion, x_T)
    assert ours.abs().max().item() > 0
    torch.testing.assert_close(ours, x.to(ours.dtype), rtol=0, atol=1e-4 * max(ours.abs().max().item(), 1.0))
