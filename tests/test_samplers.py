"""Euler, Euler-ancestral, Heun, DPM-Solver++(2M), img2img / inpainting starts, training options (zero terminal
SNR, offset noise, min-SNR-gamma) and guidance rescale, each checked against an independent formula."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from ldm.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    EulerAncestralSampler,
    EulerSampler,
    GaussianDiffusion,
    HeunSampler,
    InitImage,
    classifier_free_guidance,
    karras_sigmas,
    make_betas,
    rescale_zero_terminal_snr,
)
from ldm.diffusion.k_samplers import discrete_sigmas

from .test_diffusion import PREDICTIONS, np_alphas_cumprod, point_mass_denoiser


def test_karras_sigmas_formula():
    """Karras et al. 2022 eq. 5, written out: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    s = karras_sigmas(0.03, 14.6, 5, rho=7.0)
    ref = [(14.6 ** (1 / 7) + i / 4 * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7 for i in range(5)]
    np.testing.assert_allclose(s, ref, rtol=1e-12)
    assert s[0] == pytest.approx(14.6) and s[-1] == pytest.approx(0.03)
    assert karras_sigmas(0.03, 14.6, 1) == [14.6]


def test_discrete_sigmas_and_karras_timesteps():
    diffusion = GaussianDiffusion()
    ab = np_alphas_cumprod("scaled_linear")
    np.testing.assert_allclose(discrete_sigmas(diffusion), np.sqrt((1 - ab) / ab), rtol=1e-12)
    ts = DPMSolverPP2MSampler(20, karras=True).timesteps(diffusion)
    assert ts[0] == 999 and ts[-1] == 0 and ts == sorted(set(ts), reverse=True)
    # each timestep is the training sigma nearest (in log) to the Karras sigma it stands for
    log_sig = np.log(np.sqrt((1 - ab) / ab))
    wanted = np.log(karras_sigmas(math.exp(log_sig[0]), math.exp(log_sig[-1]), 20))
    nearest = [int(np.argmin(np.abs(log_sig - w))) for w in wanted]
    assert ts == list(dict.fromkeys(nearest))
    # Karras spends more steps at low noise than linspace does
    assert sum(t < 200 for t in ts) > sum(t < 200 for t in EulerSampler(20).timesteps(diffusion))


def toy_model(x, t):  # a non-linear network
    return 0.3 * x + 0.1 * torch.sin(3 * x) * (t.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype) / 1000)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_euler_is_ddim(spacing, prediction):
    """DDIM (eta = 0) is Euler's method in (x_t / sqrt(alpha_bar), sigma) (Song et al. 2021, eq. 13-14)."""
    diffusion = GaussianDiffusion(prediction=prediction)
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = EulerSampler(13, timestep_spacing=spacing)(toy_model, diffusion, x_T)
    b = DDIMSampler(13, timestep_spacing=spacing)(toy_model, diffusion, x_T)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("eta", [1.0, 0.4])
def test_euler_ancestral_is_ddim_with_eta(eta):
    """Euler-ancestral's sigma_up / sigma_down are DDIM's eq. 16 sigma in k-diffusion's variables: same noise →
    same samples (and with eta = 1, ancestral DDPM)."""
    diffusion = GaussianDiffusion(prediction="v")
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = EulerAncestralSampler(17, eta=eta, timestep_spacing="linspace")(
        toy_model, diffusion, x_T, generator=torch.Generator().manual_seed(3)
    )
    b = DDIMSampler(17, eta=eta, timestep_spacing="linspace")(
        toy_model, diffusion, x_T, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    if eta == 1.0:
        c = DDPMSampler(17)(toy_model, diffusion, x_T, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- Gaussian data: the exact ODE solution


def gaussian_x0_model(diffusion, mu: float, s: float):
    """Optimal network output for data N(mu, s^2), in the diffusion's parameterization."""
    ab_all = diffusion.alphas_cumprod

    def model_fn(x_t, t):
        ab = ab_all[t].to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        x0 = mu + ab.sqrt() * s**2 / (ab * s**2 + 1 - ab) * (x_t - ab.sqrt() * mu)
        return diffusion.from_x0_eps(x0, (x_t - ab.sqrt() * x0) / (1 - ab).sqrt(), t)

    return model_fn


def exact_gaussian_limit(x_T: np.ndarray, ab: np.ndarray, mu: float, s: float) -> np.ndarray:
    """The limit of every sampler here as steps grow, for data N(mu, s^2): the probability-flow ODE solved exactly
    from sigma_max to sigma_min (x - mu grows as sqrt(s^2 + sigma^2)), then the final denoising step D(x, sigma_min)."""
    sig_max2, sig_min2 = (1 - ab[-1]) / ab[-1], (1 - ab[0]) / ab[0]
    x = x_T * np.sqrt(1 + sig_max2)
    x = mu + (x - mu) * np.sqrt((s**2 + sig_min2) / (s**2 + sig_max2))
    return mu + s**2 / (s**2 + sig_min2) * (x - mu)


def vp_dpmpp_2m_reference(x_T, model_x0, timesteps, ab):
    """DPM-Solver++(2M) in the VP variables of its paper (Lu et al. 2022b, Algorithm 2), numpy float64:
    lambda = log(alpha / sigma), x_i = (sigma_i / sigma_{i-1}) x - alpha_i (e^{-h_i} - 1) D_i, with
    D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2}; the first and the last (to alpha = 1) steps first order."""
    alpha = lambda t: math.sqrt(ab[t]) if t is not None else 1.0  # noqa: E731
    sigma = lambda t: math.sqrt(1 - ab[t]) if t is not None else 0.0  # noqa: E731
    ts = list(timesteps) + [None]
    x, prev_x0, prev_h = x_T, None, None
    for i in range(len(timesteps)):
        t, t_next = ts[i], ts[i + 1]
        x0 = model_x0(x, t)
        if t_next is None:
            return x0
        h = math.log(alpha(t_next) / sigma(t_next)) - math.log(alpha(t) / sigma(t))
        d = x0 if prev_x0 is None else (1 + 1 / (2 * prev_h / h)) * x0 - 1 / (2 * prev_h / h) * prev_x0
        x = sigma(t_next) / sigma(t) * x - alpha(t_next) * math.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return x


def test_dpmpp_2m_matches_the_vp_form_of_the_paper():
    mu, s = 0.5, 0.3
    diffusion = GaussianDiffusion(prediction="eps")
    ab = np_alphas_cumprod("scaled_linear")
    x_T = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).reshape(11, 1)

    def np_x0(x, t):
        a = ab[t]
        return mu + math.sqrt(a) * s**2 / (a * s**2 + 1 - a) * (x - math.sqrt(a) * mu)

    for sampler in (DPMSolverPP2MSampler(8), DPMSolverPP2MSampler(25, karras=True)):
        out = sampler(gaussian_x0_model(diffusion, mu, s), diffusion, x_T)
        ref = vp_dpmpp_2m_reference(x_T.numpy(), np_x0, sampler.timesteps(diffusion), ab)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_heun_step_by_hand():
    """One Heun step from sigma_999 to sigma_0 and the final Euler step, for data N(0, s^2) where D(x, sigma) =
    k(sigma) x with k = s^2 / (s^2 + sigma^2): x_1 = x (1 + dt/2 ((k0 - 1)/s0 + (k1 - 1)/s1 (1 + dt (1 - k0)/s0)))."""
    s = 0.7
    diffusion = GaussianDiffusion(prediction="x0")
    sig = discrete_sigmas(diffusion)
    s0, s1 = sig[999], sig[0]
    k0, k1 = s**2 / (s**2 + s0**2), s**2 / (s**2 + s1**2)
    dt = s1 - s0
    x_T = torch.tensor([[1.0], [-0.4]], dtype=torch.float64)
    x = x_T.numpy() * math.sqrt(1 + s0**2)
    x1 = x * (1 + dt / 2 * ((1 - k0) / s0 + (1 - k1) / s1 * (1 + dt * (1 - k0) / s0)))
    out = HeunSampler(2)(gaussian_x0_model(diffusion, 0.0, s), diffusion, x_T)
    np.testing.assert_allclose(out.numpy(), k1 * x1, rtol=1e-12)


@pytest.mark.parametrize(
    ("make", "order"),
    [(EulerSampler, 1), (HeunSampler, 2), (DPMSolverPP2MSampler, 2)],
    ids=["euler", "heun", "dpmpp_2m"],
)
def test_convergence_to_the_exact_solution(make, order):
    """Data N(mu, s^2): the error to the exact ODE solution falls with the steps, at the solver's order
    (on Karras sigmas, smooth in log sigma, which all three end at sigma_0 as the exact limit does)."""
    mu, s = 0.5, 0.3
    diffusion = GaussianDiffusion(prediction="v")
    ab = np_alphas_cumprod("scaled_linear")
    x_T = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).reshape(11, 1)
    exact = exact_gaussian_limit(x_T.numpy(), ab, mu, s)
    model = gaussian_x0_model(diffusion, mu, s)
    steps = [10, 20, 40]
    errors = [np.abs(make(n, karras=True)(model, diffusion, x_T).numpy() - exact).max() for n in steps]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
    assert rates[-1] > 0.8 * order, (errors, rates)
    if order == 2:
        euler = np.abs(EulerSampler(20, karras=True)(model, diffusion, x_T).numpy() - exact).max()
        assert errors[1] < euler / 5  # 20 steps of a 2nd-order solver beat 20 Euler steps by far


def mixture_model(diffusion, mus=(-0.8, 0.6), s=0.15, weights=(0.3, 0.7)):
    """Optimal x0-prediction for a two-Gaussian mixture (non-linear in x_t): E[x0 | x_t] in closed form."""
    ab_all = diffusion.alphas_cumprod

    def model_fn(x_t, t):
        ab = ab_all[t].to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        var = ab * s**2 + 1 - ab
        logp = torch.stack(
            [math.log(w) - (x_t - ab.sqrt() * m) ** 2 / (2 * var) for m, w in zip(mus, weights, strict=True)]
        )
        post = torch.softmax(logp, dim=0)
        means = torch.stack([m + ab.sqrt() * s**2 / var * (x_t - ab.sqrt() * m) for m in mus])
        x0 = (post * means).sum(0)
        return diffusion.from_x0_eps(x0, (x_t - ab.sqrt() * x0) / (1 - ab).sqrt(), t)

    return model_fn


@functools.cache
def mixture_reference() -> tuple[GaussianDiffusion, object, torch.Tensor, torch.Tensor]:
    """(diffusion, mixture model, x_T, 500-step Heun sample): the high-step reference, computed once."""
    diffusion = GaussianDiffusion(prediction="eps")
    model = mixture_model(diffusion)
    x_T = torch.linspace(-2.5, 2.5, 21, dtype=torch.float64).reshape(21, 1)
    return diffusion, model, x_T, HeunSampler(500)(model, diffusion, x_T)


@pytest.mark.parametrize(
    "make",
    [EulerSampler, HeunSampler, DPMSolverPP2MSampler, lambda n: DPMSolverPP2MSampler(n, karras=True)],
    ids=["euler", "heun", "dpmpp_2m", "dpmpp_2m_karras"],
)
def test_convergence_to_a_high_step_reference(make):
    """A non-linear denoiser (mixture of two Gaussians): more steps → closer to a 500-step Heun reference."""
    diffusion, model, x_T, ref = mixture_reference()
    errors = [(make(n)(model, diffusion, x_T) - ref).abs().max().item() for n in (5, 10, 20, 40)]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.3 * errors[0]


def test_dpmpp_2m_karras_at_20_steps_beats_ddim_at_50():
    """The issue's goal, on a toy whose exact denoiser is known: error to a 500-step Heun reference."""
    diffusion, model, x_T, ref = mixture_reference()

    def error(sampler):
        return (sampler(model, diffusion, x_T) - ref).abs().max().item()

    dpm = error(DPMSolverPP2MSampler(20, karras=True))
    assert dpm < error(DDIMSampler(50)) and dpm < error(DDIMSampler(20)) / 3


def test_sigma_max_cap_on_the_cosine_schedule():
    """The clipped cosine schedule's sigma_{T-1} is ~20000: Heun's first step from there, and Karras sigmas
    spread up to there, miss the exact ODE solution; starting at the largest training sigma <= 80 fixes both."""
    diffusion = GaussianDiffusion(schedule="cosine", prediction="v")
    sigmas = np.array(discrete_sigmas(diffusion))  # checked against the closed form in test_diffusion
    assert sigmas[-1] > 1000
    top = int(np.nonzero(sigmas <= 80)[0].max())
    assert sigmas[top] <= 80 < sigmas[top + 1]
    heun = HeunSampler(10, sigma_max=80.0)
    assert heun.timesteps(diffusion) == [top] + HeunSampler(10).timesteps(diffusion)[1:]
    karras = DPMSolverPP2MSampler(10, karras=True, sigma_max=80.0).timesteps(diffusion)
    assert karras[0] == top and karras[-1] == 0 and karras == sorted(set(karras), reverse=True)
    assert EulerSampler(10, sigma_max=1e9).timesteps(diffusion) == EulerSampler(10).timesteps(diffusion)

    model = mixture_model(diffusion)
    x_T = torch.linspace(-2.5, 2.5, 21, dtype=torch.float64).reshape(21, 1)
    ref = DDIMSampler(1000)(model, diffusion, x_T)

    def error(sampler):
        return (sampler(model, diffusion, x_T) - ref).abs().max().item()

    capped = [error(HeunSampler(n, sigma_max=80.0)) for n in (10, 20, 40)]
    assert all(b < a for a, b in zip(capped, capped[1:], strict=False)), capped
    assert capped[1] < error(HeunSampler(20)) / 10
    assert (
        error(DPMSolverPP2MSampler(20, karras=True, sigma_max=80.0))
        < error(DPMSolverPP2MSampler(20, karras=True)) / 3
    )
    with pytest.raises(ValueError, match="sigma_max"):
        HeunSampler(10, sigma_max=0.0)


def test_k_samplers_match_diffusers():
    """The same discrete sigmas through diffusers' Euler / Heun / DPMSolverMultistep schedulers (float32 there)."""
    diffusers = pytest.importorskip("diffusers")
    kw = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    diffusion = GaussianDiffusion(prediction="v")
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cases = [
        (EulerSampler(12, timestep_spacing="trailing"), diffusers.EulerDiscreteScheduler(**kw), True),
        (HeunSampler(9, timestep_spacing="trailing"), diffusers.HeunDiscreteScheduler(**kw), True),
        (
            DPMSolverPP2MSampler(16, timestep_spacing="trailing"),
            diffusers.DPMSolverMultistepScheduler(**kw, final_sigmas_type="zero"),
            False,
        ),
    ]
    for sampler, scheduler, sigma_space in cases:
        scheduler.set_timesteps(sampler.num_steps)
        x = x_T * math.sqrt(1 + float(scheduler.sigmas[0]) ** 2) if sigma_space else x_T.clone()
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, t)
            out = toy_model(model_in, torch.full((2,), int(t), dtype=torch.long))
            x = scheduler.step(out, t, x).prev_sample
        ours = sampler(toy_model, diffusion, x_T)
        torch.testing.assert_close(ours, x.to(ours.dtype), rtol=0, atol=5e-6)


@pytest.mark.parametrize(
    "sampler", [EulerAncestralSampler(10), EulerAncestralSampler(10, karras=True)], ids=repr
)
def test_euler_ancestral_is_reproducible_and_stochastic(sampler):
    diffusion = GaussianDiffusion()
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def run(seed):
        return sampler(toy_model, diffusion, x_T, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1)) and not torch.allclose(run(1), run(2))


def test_invalid_k_sampler_arguments():
    with pytest.raises(ValueError, match="leading"):
        EulerSampler(10, timestep_spacing="karras")
    with pytest.raises(ValueError, match="num_steps"):
        HeunSampler(0)
    with pytest.raises(ValueError, match="eta"):
        EulerAncestralSampler(10, eta=-1)


# ---------------------------------------------------------------- img2img and inpainting


ALL_SAMPLERS = [
    DDIMSampler(10),
    DDIMSampler(10, eta=1.0),
    DDPMSampler(10),
    EulerSampler(10),
    EulerAncestralSampler(10),
    HeunSampler(6),
    DPMSolverPP2MSampler(10),
    DPMSolverPP2MSampler(10, karras=True),
]


def _timesteps(sampler, diffusion):
    return (
        sampler.timesteps(diffusion)
        if hasattr(sampler, "karras")
        else sampler.timesteps(diffusion.num_timesteps)
    )


ONE_STEP = [
    DDIMSampler(1),
    DDIMSampler(1, timestep_spacing="linspace"),
    DDPMSampler(1),
    EulerSampler(1),
    EulerAncestralSampler(1),
    HeunSampler(1),
    DPMSolverPP2MSampler(1),
    DPMSolverPP2MSampler(1, karras=True),
]


@pytest.mark.parametrize("sampler", ONE_STEP, ids=repr)
def test_one_step_denoises_pure_noise(sampler):
    """Data N(0, s^2): the optimal x0-predictor is E[x0 | x_t] = sqrt(ab) s^2 / (ab s^2 + 1 - ab) x_t. One step from
    t = T - 1 (alpha_bar ~ 0.005) lands near that mean, shrinking the noise by ~0.02; a step from t = 0 would hand
    the noise back almost unchanged."""
    s2 = 0.25
    diffusion = GaussianDiffusion(prediction="x0")
    ab_all = diffusion.alphas_cumprod.double()
    seen = []

    def gaussian_data_denoiser(x_t, t):
        seen.append(t.double().max().item())
        ab = ab_all[t.long().clamp(0, len(ab_all) - 1)].reshape(-1, 1, 1, 1)
        return ab.sqrt() * s2 / (ab * s2 + 1 - ab) * x_t

    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler(gaussian_data_denoiser, diffusion, x_T, generator=torch.Generator().manual_seed(1))
    assert seen[0] >= diffusion.num_timesteps - 1.5
    assert out.std() < 0.1 * x_T.std()


@pytest.mark.parametrize("sampler", ALL_SAMPLERS, ids=repr)
def test_inpainting_keeps_the_known_region_exactly(sampler):
    """Any model, any sampler: the kept region of the output is the given latents; the rest is generated."""
    diffusion = GaussianDiffusion(prediction="v")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    mask[..., 2:5, 1:4] = 1
    x_T = torch.randn(latents.shape, generator=g, dtype=torch.float64)
    out = sampler(toy_model, diffusion, x_T, generator=g, init=InitImage(latents, mask=mask))
    keep = (mask == 0).expand_as(out)
    torch.testing.assert_close(out[keep], latents[keep], rtol=0, atol=1e-12)
    plain = sampler(toy_model, diffusion, x_T, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out[~keep], latents[~keep]) and not torch.allclose(out, plain)


@pytest.mark.parametrize("sampler", ALL_SAMPLERS, ids=repr)
def test_inpainting_with_a_perfect_denoiser_returns_the_data(sampler):
    diffusion = GaussianDiffusion(prediction="eps")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    mask = (torch.rand(1, 1, 4, 4, generator=g) > 0.5).double()
    out = sampler(
        point_mass_denoiser(diffusion, x0),
        diffusion,
        torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64),
        generator=g,
        init=InitImage(x0.expand(2, -1, -1, -1), strength=0.6, mask=mask),
    )
    torch.testing.assert_close(out, x0.expand_as(out), rtol=0, atol=1e-9)


@pytest.mark.parametrize("sampler", [DDIMSampler(20), DPMSolverPP2MSampler(20), HeunSampler(20)], ids=repr)
def test_img2img_strength(sampler):
    """strength s runs the last int(s * steps) steps from the image's latents noised to the first of them: so
    with a model that calls back, the first timestep is the one SDEdit prescribes, and the output approaches the
    image as the strength falls."""
    diffusion = GaussianDiffusion(prediction="v")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    x_T = torch.randn(latents.shape, generator=g, dtype=torch.float64)
    seen = []

    def model(x, t):
        seen.append((x.clone(), int(t[0])))
        return toy_model(x, t)

    ts = _timesteps(sampler, diffusion)
    distances = []
    for strength in (1.0, 0.75, 0.3, 0.05):
        seen.clear()
        out = sampler(model, diffusion, x_T, init=InitImage(latents, strength=strength))
        n = max(1, int(len(ts) * strength))
        first_x, first_t = seen[0]
        assert first_t == ts[len(ts) - n]
        ab = diffusion.alphas_cumprod[first_t].item()
        expected = x_T if strength == 1.0 else math.sqrt(ab) * latents + math.sqrt(1 - ab) * x_T
        torch.testing.assert_close(first_x, expected, rtol=1e-12, atol=1e-12)
        distances.append((out - latents).square().mean().item())
    assert distances == sorted(distances, reverse=True)
    torch.testing.assert_close(
        sampler(toy_model, diffusion, x_T, init=InitImage(latents, strength=1.0)),
        sampler(toy_model, diffusion, x_T),
    )
    with pytest.raises(ValueError, match="strength"):
        InitImage(latents, strength=0.0)


# ---------------------------------------------------------------- training options


def test_zero_terminal_snr_rescale_matches_algorithm_1():
    """Lin et al. 2024, Algorithm 1, in numpy: sqrt(alpha_bar) shifted to end at 0 and scaled to keep its start."""
    betas = make_betas("scaled_linear", 1000)
    sqrt_ab = np.sqrt(np_alphas_cumprod("scaled_linear"))
    ref = (sqrt_ab - sqrt_ab[-1]) * sqrt_ab[0] / (sqrt_ab[0] - sqrt_ab[-1])
    diffusion = GaussianDiffusion(zero_terminal_snr=True, prediction="v")
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), ref**2, rtol=1e-10, atol=1e-300)
    assert diffusion.alphas_cumprod[-1].item() == 0.0 and diffusion.snr(torch.tensor([999])).item() == 0.0
    assert diffusion.alphas_cumprod[0].item() == pytest.approx(1 - betas[0].item(), rel=1e-12)
    assert (diffusion.alphas_cumprod[1:] < diffusion.alphas_cumprod[:-1]).all()
    assert rescale_zero_terminal_snr(betas)[-1].item() == 1.0
    with pytest.raises(ValueError, match="prediction=v"):
        GaussianDiffusion(zero_terminal_snr=True, prediction="eps")


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize(
    "sampler",
    [
        DDIMSampler(10, timestep_spacing="trailing"),
        DDPMSampler(10),
        EulerSampler(10),
        HeunSampler(5),
        DPMSolverPP2MSampler(10, karras=True),
    ],
    ids=repr,
)
def test_zero_terminal_snr_sampling_is_finite_and_exact(sampler, prediction):
    diffusion = GaussianDiffusion("scaled_linear", prediction=prediction, zero_terminal_snr=True)
    assert _timesteps(sampler, diffusion)[0] == 999  # these start at the pure-noise step
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    out = sampler(
        point_mass_denoiser(diffusion, x0),
        diffusion,
        torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64),
        generator=g,
    )
    torch.testing.assert_close(out, x0.expand_as(out), rtol=0, atol=1e-7)


def test_offset_noise_statistics():
    """noise + offset * N(0, 1) per (sample, channel): per-channel spatial means have variance 1/(HW) + offset^2."""
    n, c, hw = 4000, 3, 8
    plain = GaussianDiffusion().training_noise(
        (n, c, hw, hw), "cpu", torch.float64, torch.Generator().manual_seed(0)
    )
    offset = GaussianDiffusion(offset_noise=0.3).training_noise(
        (n, c, hw, hw), "cpu", torch.float64, torch.Generator().manual_seed(0)
    )
    for noise, expected in ((plain, 1 / hw**2), (offset, 1 / hw**2 + 0.09)):
        assert noise.mean(dim=(2, 3)).var().item() == pytest.approx(expected, rel=0.06)
    # the loss draws its noise that way: a generator-seeded loss sees the offset noise
    diffusion = GaussianDiffusion(offset_noise=0.3, prediction="eps")
    x0 = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    seen = {}

    def model(x_t, t):
        seen["noise"] = (x_t - 0) / diffusion.sqrt_one_minus(t, x_t)
        return torch.zeros_like(x_t)

    diffusion.sqrt_one_minus = lambda t, x: diffusion._coef("sqrt_one_minus_alphas_cumprod", t, x)
    diffusion.loss(model, x0, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    diffusion.sample_timesteps(2, "cpu", generator=g)
    expected = diffusion.training_noise(x0.shape, "cpu", torch.float64, generator=g)
    torch.testing.assert_close(seen["noise"], expected)


def test_min_snr_weights_match_the_paper():
    gamma = 5.0
    t = torch.tensor([0, 100, 300, 500, 700, 999])
    ab = np_alphas_cumprod("scaled_linear")[t.numpy()]
    snr = ab / (1 - ab)
    expected = {
        "x0": np.minimum(snr, gamma),
        "eps": np.minimum(snr, gamma) / snr,
        "v": np.minimum(snr, gamma) / (snr + 1),
    }
    for prediction in PREDICTIONS:
        w = GaussianDiffusion(prediction=prediction, min_snr_gamma=gamma).loss_weights(t)
        np.testing.assert_allclose(w.numpy(), expected[prediction], rtol=1e-6)
        assert torch.equal(GaussianDiffusion(prediction=prediction).loss_weights(t), torch.ones(6))
    # zero terminal SNR: finite weights everywhere
    w = GaussianDiffusion(prediction="v", zero_terminal_snr=True, min_snr_gamma=gamma).loss_weights(
        torch.arange(1000)
    )
    assert torch.isfinite(w).all() and w[-1] == 0


def test_min_snr_loss_is_the_same_in_every_parameterization():
    """For networks that imply the same x0 error, the min-SNR-weighted loss does not depend on the
    parameterization: it is min(SNR, gamma) ||x0_hat - x0||^2 (Hang et al. 2023, eq. 11)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 50, 200, 500, 800, 999])
    losses = {}
    for prediction in PREDICTIONS:
        diffusion = GaussianDiffusion(prediction=prediction, min_snr_gamma=5.0)

        def model(x_t, t_in, diffusion=diffusion):
            ab = diffusion._coef("alphas_cumprod", t_in, x_t)
            return diffusion.from_x0_eps(x0_hat, (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt(), t_in)

        out = diffusion.loss(model, x0, t=t, noise=noise)
        losses[prediction] = out.loss.item()
        assert out.weights.shape == (6,)
    snr = torch.tensor(np_alphas_cumprod("scaled_linear")[t.numpy()])
    snr = snr / (1 - snr)
    expected = (snr.clamp(max=5.0) * (x0_hat - x0).square().mean(dim=(1, 2, 3))).mean().item()
    for value in losses.values():
        assert value == pytest.approx(expected, rel=1e-6)  # weights are float32


def test_training_options_in_describe_and_repr():
    diffusion = GaussianDiffusion(
        "cosine", prediction="v", zero_terminal_snr=True, offset_noise=0.1, min_snr_gamma=5.0
    )
    assert diffusion.describe() == {
        "schedule": "cosine",
        "num_timesteps": 1000,
        "prediction": "v",
        "zero_terminal_snr": True,
        "offset_noise": 0.1,
        "min_snr_gamma": 5.0,
    }
    assert "zero_terminal_snr=True" in repr(diffusion)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        GaussianDiffusion(min_snr_gamma=0.0)


# ---------------------------------------------------------------- guidance rescale


def test_guidance_rescale_matches_eq_15_16():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 500, 999])
    out_c, out_u = torch.randn(2, *x.shape, generator=g, dtype=torch.float64)
    out_c = 2 * out_c + 0.5
    for phi in (0.0, 0.7, 1.0):
        guided = classifier_free_guidance(lambda x, t, c: c, out_c, out_u, 7.5, rescale=phi)(x, t)
        cfg = out_u + 7.5 * (out_c - out_u)
        ref = np.empty(cfg.shape)
        for i in range(3):  # per sample, with numpy's std (ddof=1 as torch's default; the ratio is the same)
            ratio = out_c[i].numpy().std(ddof=1) / cfg[i].numpy().std(ddof=1)
            ref[i] = phi * cfg[i].numpy() * ratio + (1 - phi) * cfg[i].numpy()
        np.testing.assert_allclose(guided.numpy(), ref, rtol=1e-12)
        if phi == 1.0:  # fully rescaled: the guided output has the conditional output's std
            np.testing.assert_allclose(
                guided.std(dim=(1, 2, 3)).numpy(), out_c.std(dim=(1, 2, 3)).numpy(), rtol=1e-12
            )
    with pytest.raises(ValueError, match="rescale"):
        classifier_free_guidance(lambda x, t, c: c, out_c, out_u, 7.5, rescale=1.5)
