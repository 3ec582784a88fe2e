"""ldm.diffusion: schedules, parameterizations, loss, samplers and guidance, checked against independent formulas."""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import ldm.diffusion
from ldm.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DiffusionLoss,
    DPMSolverPP2MSampler,
    EulerAncestralSampler,
    EulerSampler,
    GaussianDiffusion,
    HeunSampler,
    RectifiedFlow,
    classifier_free_guidance,
    drop_conditioning,
    make_betas,
)
from ldm.diffusion.samplers import sampling_timesteps

PREDICTIONS = ["eps", "v", "x0"]


def np_alphas_cumprod(kind: str, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
    """Independent numpy reference for the linear schedules."""
    if kind == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    else:
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_betas_valid_and_alphas_cumprod_decreasing(kind):
    betas = make_betas(kind, 1000)
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    assert (betas > 0).all() and (betas < 1).all()
    ab = torch.cumprod(1 - betas, 0)
    assert (ab[1:] < ab[:-1]).all()
    assert 0 < ab[-1] < ab[0] < 1


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_linear_schedules_match_numpy(kind):
    ab = torch.cumprod(1 - make_betas(kind, 1000), 0).numpy()
    np.testing.assert_allclose(ab, np_alphas_cumprod(kind), rtol=1e-12)


def test_known_schedule_values():
    # Stable Diffusion: scaled_linear(0.00085, 0.012) ends at alpha_bar ~ 0.00466 (terminal SNR ~ 0.0047).
    sd = GaussianDiffusion("scaled_linear", 1000)
    assert sd.alphas_cumprod[-1].item() == pytest.approx(np_alphas_cumprod("scaled_linear")[-1], rel=1e-12)
    assert sd.alphas_cumprod[-1].item() == pytest.approx(0.0046601, rel=1e-4)
    # DDPM: linear(1e-4, 0.02) ends at alpha_bar ~ 4.036e-5.
    ddpm = GaussianDiffusion("linear", 1000, beta_start=1e-4, beta_end=0.02)
    assert ddpm.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)
    assert ddpm.alphas_cumprod[-1].item() == pytest.approx(
        np_alphas_cumprod("linear", 1000, 1e-4, 0.02)[-1], rel=1e-12
    )


def test_cosine_matches_closed_form():
    T, s = 1000, 0.008

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = make_betas("cosine", T, cosine_s=s)
    ab = torch.cumprod(1 - betas, 0)
    for t in [1, 2, 10, 100, 250, 500, 750, 900, 990]:  # ab[t - 1] is alpha_bar after t steps
        assert ab[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-10)
    assert betas.max().item() == 0.999  # alpha_bar(T) = 0, so the last beta is clipped


def test_unknown_schedule_lists_valid_kinds():
    with pytest.raises(ValueError, match="linear.*scaled_linear.*cosine"):
        make_betas("quadratic", 10)


def test_unknown_prediction():
    with pytest.raises(ValueError, match="eps"):
        GaussianDiffusion(prediction="score")


# ---------------------------------------------------------------- forward process and parameterizations


def test_q_sample_statistics():
    diffusion = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    n, c, t = 200_000, 0.7, 400
    x0 = torch.full((n, 1), c, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = diffusion.q_sample(x0, torch.full((n,), t), noise)
    ab = np_alphas_cumprod("scaled_linear")[t]
    assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * c, abs=0.01)
    assert x_t.std().item() == pytest.approx(math.sqrt(1 - ab), rel=0.01)


@pytest.mark.parametrize("shape", [(4, 3), (4, 2, 5), (4, 4, 8, 8), (4, 2, 3, 4, 5)])
def test_coefficients_broadcast_per_sample(shape):
    diffusion = GaussianDiffusion()
    x0 = torch.ones(shape, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    x_t = diffusion.q_sample(x0, t, torch.zeros_like(x0))
    ab = np_alphas_cumprod("scaled_linear")[t.numpy()]
    for i in range(4):
        torch.testing.assert_close(x_t[i], torch.full(shape[1:], math.sqrt(ab[i]), dtype=torch.float64))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_target_round_trip(prediction):
    diffusion = GaussianDiffusion(prediction=prediction)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    x0_hat, eps_hat = diffusion.to_x0_eps(diffusion.target(x0, noise, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-10)


def test_v_target_matches_independent_formula():
    diffusion = GaussianDiffusion(prediction="v")
    x0 = torch.linspace(-1, 1, 2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 4)
    noise = torch.cos(torch.arange(24, dtype=torch.float64)).reshape(2, 3, 4)
    t = torch.tensor([17, 803])
    ab = np_alphas_cumprod("scaled_linear")[t.numpy()].reshape(2, 1, 1)
    v = np.sqrt(ab) * noise.numpy() - np.sqrt(1 - ab) * x0.numpy()
    np.testing.assert_allclose(diffusion.target(x0, noise, t).numpy(), v, rtol=1e-12)
    # angle form (Salimans & Ho 2022): with phi = atan(sigma / alpha), v = cos(phi) eps - sin(phi) x0
    phi = np.arctan2(np.sqrt(1 - ab), np.sqrt(ab))
    np.testing.assert_allclose(v, np.cos(phi) * noise.numpy() - np.sin(phi) * x0.numpy(), rtol=1e-12)


def test_snr():
    diffusion = GaussianDiffusion()
    t = torch.tensor([0, 100, 999])
    ab = np_alphas_cumprod("scaled_linear")[t.numpy()]
    np.testing.assert_allclose(diffusion.snr(t).numpy(), ab / (1 - ab), rtol=1e-6)
    snr = diffusion.snr(torch.arange(1000))
    assert snr.dtype == torch.float32 and (snr[1:] < snr[:-1]).all()


def test_methods_follow_the_tensor_device():
    diffusion = GaussianDiffusion()
    assert diffusion.to("cpu") is diffusion
    x0 = torch.empty(2, 3, device="meta")
    x_t = diffusion.q_sample(x0, torch.zeros(2, dtype=torch.long, device="meta"), x0)
    assert x_t.device.type == "meta" and x_t.shape == (2, 3)
    assert diffusion.snr(torch.zeros(2, dtype=torch.long, device="meta")).device.type == "meta"
    assert diffusion.to("meta").alphas_cumprod.device.type == "meta"
    # the float64 values survive a round trip through a device that holds no data
    assert diffusion.to("cpu").alphas_cumprod.dtype == torch.float64
    assert diffusion.alphas_cumprod[-1].item() == pytest.approx(np_alphas_cumprod("scaled_linear")[-1])


def test_coefficients_take_the_dtype_of_x():
    diffusion = GaussianDiffusion(prediction="v")
    x = torch.randn(2, 3, dtype=torch.bfloat16)
    t = torch.tensor([3, 900])
    assert diffusion.q_sample(x, t, x).dtype == torch.bfloat16
    assert all(y.dtype == torch.float32 for y in diffusion.to_x0_eps(x, x.float(), t))


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_zero_for_perfect_model_and_positive_otherwise(prediction):
    diffusion = GaussianDiffusion(prediction=prediction)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 4, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = diffusion.sample_timesteps(5, "cpu", generator=g)
    seen = {}

    def perfect(x_t, t_in):
        seen["t"] = t_in
        return diffusion.target(x0, noise, t_in)

    out = diffusion.loss(perfect, x0, t=t, noise=noise)
    assert isinstance(out, DiffusionLoss)
    assert out.per_sample.shape == (5,) and out.loss.shape == ()
    assert out.loss.item() == 0.0
    assert seen["t"].dtype == torch.long and seen["t"].shape == (5,) and torch.equal(out.t, t)

    zero = diffusion.loss(lambda x_t, t_in: torch.zeros_like(x_t), x0, t=t, noise=noise)
    target = diffusion.target(x0, noise, t)
    torch.testing.assert_close(zero.per_sample, target.square().mean(dim=(1, 2, 3)))
    assert (zero.per_sample > 0).all()
    torch.testing.assert_close(zero.loss, zero.per_sample.mean())


def test_loss_draws_t_and_noise_from_the_generator():
    diffusion = GaussianDiffusion()
    x0 = torch.randn(8, 3, 4, 4)

    def model(x_t, t):
        return 0.5 * x_t

    a = diffusion.loss(model, x0, generator=torch.Generator().manual_seed(3))
    b = diffusion.loss(model, x0, generator=torch.Generator().manual_seed(3))
    c = diffusion.loss(model, x0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.per_sample, b.per_sample) and torch.equal(a.t, b.t)
    assert not torch.equal(a.t, c.t)
    assert a.t.dtype == torch.long and ((a.t >= 0) & (a.t < 1000)).all()


def test_loss_is_computed_in_float32_for_bf16_outputs():
    diffusion = GaussianDiffusion()
    x0 = torch.randn(4, 2, 3)
    out = diffusion.loss(lambda x_t, t: x_t.bfloat16(), x0, generator=torch.Generator().manual_seed(0))
    assert out.loss.dtype == torch.float32


def test_sample_timesteps_uniform():
    diffusion = GaussianDiffusion(num_timesteps=10)
    t = diffusion.sample_timesteps(100_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 9
    counts = torch.bincount(t, minlength=10).double() / t.numel()
    assert torch.allclose(counts, torch.full((10,), 0.1, dtype=torch.float64), atol=0.005)


# ---------------------------------------------------------------- samplers


def point_mass_denoiser(diffusion: GaussianDiffusion, x0: torch.Tensor):
    """Optimal network output when the data is the single point x0: E[x0 | x_t] = x0, written per prediction."""
    ab_all = diffusion.alphas_cumprod

    def model_fn(x_t, t):
        ab = ab_all[t].to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return {"eps": eps, "x0": x0.expand_as(x_t), "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[
            diffusion.prediction
        ]

    return model_fn


SAMPLERS = [
    DDIMSampler(num_steps=1),
    DDIMSampler(num_steps=10),
    DDIMSampler(num_steps=50),
    DDIMSampler(num_steps=10, eta=1.0),
    DDIMSampler(num_steps=37, eta=1.0, timestep_spacing="trailing"),
    DDIMSampler(num_steps=20, eta=0.5, timestep_spacing="linspace"),
    DDPMSampler(),
    DDPMSampler(num_steps=25),
]

# the k-diffusion-style samplers (tests/test_samplers.py has their own tests)
K_SAMPLERS = [
    EulerSampler(1),
    EulerSampler(10),
    EulerAncestralSampler(10),
    EulerAncestralSampler(7, eta=0.5, timestep_spacing="trailing"),
    HeunSampler(10),
    HeunSampler(6, karras=True),
    DPMSolverPP2MSampler(2),
    DPMSolverPP2MSampler(20),
    DPMSolverPP2MSampler(20, karras=True),
    DPMSolverPP2MSampler(15, timestep_spacing="leading"),
    DPMSolverPP2MSampler(15, timestep_spacing="linspace"),
]


@pytest.mark.parametrize("sampler", SAMPLERS + K_SAMPLERS, ids=repr)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_perfect_denoiser_returns_the_data_point(sampler, prediction):
    diffusion = GaussianDiffusion(prediction=prediction)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    x_T = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    out = sampler(point_mass_denoiser(diffusion, x0), diffusion, x_T, generator=g)
    torch.testing.assert_close(out, x0.expand_as(out), rtol=0, atol=1e-9)


def test_perfect_denoiser_float32():
    diffusion = GaussianDiffusion(prediction="eps")
    x0 = torch.linspace(-1, 1, 48).reshape(1, 3, 4, 4)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = DDIMSampler(50)(point_mass_denoiser(diffusion, x0), diffusion, x_T)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x0.expand_as(out), rtol=0, atol=1e-4)


def gaussian_denoiser(diffusion: GaussianDiffusion, mu: float, s: float):
    """Optimal network output for data N(mu, s^2): E[x0 | x_t] = mu + sqrt(ab) s^2 / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu)."""
    ab_all = diffusion.alphas_cumprod

    def model_fn(x_t, t):
        ab = ab_all[t].to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        x0 = mu + ab.sqrt() * s**2 / (ab * s**2 + 1 - ab) * (x_t - ab.sqrt() * mu)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[diffusion.prediction]

    return model_fn


def gaussian_sampler_moments(sampler, ab: np.ndarray, timesteps: list[int], mu: float, s: float):
    """Exact mean and std of a sampler's output for data N(mu, s^2) and x_T ~ N(0, 1).

    With the optimal denoiser every step is affine in x plus independent noise, so the moments follow a
    scalar recursion: DDIM eq. 12 with eq. 16's sigma (eta = 1 with the same timesteps is the DDPM step).
    """
    m, var = 0.0, 1.0
    for i, t in enumerate(timesteps):
        a, a_prev = ab[t], (ab[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0)
        k = math.sqrt(a) * s**2 / (a * s**2 + 1 - a)  # x0_hat = k x + c
        c = mu - k * math.sqrt(a) * mu
        eta = getattr(sampler, "eta", 1.0)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        d = math.sqrt(1 - a_prev - sigma**2) / math.sqrt(
            1 - a
        )  # eps_hat = (x - sqrt(a) x0_hat) / sqrt(1 - a)
        slope = math.sqrt(a_prev) * k + d * (1 - math.sqrt(a) * k)
        m = slope * m + math.sqrt(a_prev) * c - d * math.sqrt(a) * c
        var = slope**2 * var + sigma**2
    return m, math.sqrt(var)


GAUSSIAN_SAMPLERS = [
    DDIMSampler(10),
    DDIMSampler(100),
    DDIMSampler(1000),
    DDIMSampler(50, eta=1.0, timestep_spacing="trailing"),
    DDPMSampler(20),
    DDPMSampler(),
]


@pytest.mark.parametrize(
    ("sampler", "prediction"),
    [(s, "eps") for s in GAUSSIAN_SAMPLERS] + [(DDIMSampler(100), "v"), (DDPMSampler(20), "v")],
    ids=repr,
)
def test_gaussian_data_moments(sampler, prediction):
    """Data N(mu, s^2), optimal denoiser: the samples have the moments of the exact recursion, and with
    all T steps those are close to (mu, s) (few steps shrink the variance: a discretization error)."""
    mu, s, n = 0.5, 0.3, 4000
    diffusion = GaussianDiffusion(prediction=prediction)
    g = torch.Generator().manual_seed(6)
    x_T = torch.randn(n, 1, dtype=torch.float64, generator=g)
    out = sampler(gaussian_denoiser(diffusion, mu, s), diffusion, x_T, generator=g)
    m, sd = gaussian_sampler_moments(
        sampler, np_alphas_cumprod("scaled_linear"), sampler.timesteps(1000), mu, s
    )
    assert out.mean().item() == pytest.approx(m, abs=4 * sd / math.sqrt(n))
    assert out.std().item() == pytest.approx(sd, abs=4 * sd / math.sqrt(2 * n))
    if len(sampler.timesteps(1000)) == 1000:
        assert abs(m - mu) < 0.015 and abs(sd - s) < 0.01


def ddim_reference(x_T: np.ndarray, eps_fn, timesteps, ab: np.ndarray) -> np.ndarray:
    """DDIM eq. 12 with eta = 0, written out in numpy float64 (independent of the sampler)."""
    x = x_T
    for i, t in enumerate(timesteps):
        a_t = ab[t]
        a_prev = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        eps = eps_fn(x, t)
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    return x


def test_ddim_full_loop_golden():
    """Like diffusers' test_full_loop_no_noise: a linear model makes the whole loop a scalar multiple of x_T."""
    diffusion = GaussianDiffusion("scaled_linear", 1000, prediction="eps")
    x_T = torch.sin(torch.arange(2 * 4 * 8 * 8, dtype=torch.float64)).reshape(2, 4, 8, 8) + 0.25
    out = DDIMSampler(50)(lambda x, t: 0.1 * x, diffusion, x_T)

    ab = np_alphas_cumprod("scaled_linear")
    timesteps = list(range(980, -1, -20))
    ref = ddim_reference(x_T.numpy(), lambda x, t: 0.1 * x, timesteps, ab)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12)
    # closed form: each step multiplies x by sqrt(a_prev / a_t) (1 - 0.1 sqrt(1 - a_t)) + 0.1 sqrt(1 - a_prev)
    prevs = [ab[t] for t in timesteps[1:]] + [1.0]
    c = math.prod(
        math.sqrt(p / ab[t]) * (1 - 0.1 * math.sqrt(1 - ab[t])) + 0.1 * math.sqrt(1 - p)
        for t, p in zip(timesteps, prevs, strict=True)
    )
    assert out.sum().item() == pytest.approx(c * x_T.sum().item(), rel=1e-12)
    assert c == pytest.approx(9.521748, rel=1e-6)  # the closed form's value, pinned against schedule drift


def test_ddim_full_loop_v_prediction_matches_reference():
    diffusion = GaussianDiffusion("scaled_linear", 1000, prediction="v")
    ab = np_alphas_cumprod("scaled_linear")
    x_T = torch.cos(torch.arange(3 * 5, dtype=torch.float64)).reshape(3, 5)

    def v_model(x, t):  # a non-linear toy network
        return torch.tanh(x) * (t.reshape(-1, 1).to(x.dtype) / 1000)

    out = DDIMSampler(25, timestep_spacing="trailing")(v_model, diffusion, x_T)

    def eps_fn(x, t):  # the same network, its v converted to eps independently
        v = np.tanh(x) * t / 1000
        return np.sqrt(1 - ab[t]) * x + np.sqrt(ab[t]) * v

    ref = ddim_reference(x_T.numpy(), eps_fn, list(range(999, 0, -40)), ab)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_steps", [1, 20, 1000])
def test_ddim_eta_one_equals_respaced_ddpm(num_steps):
    """DDIM with eta = 1 is the ancestral DDPM step: same timesteps and noise → the same samples."""
    diffusion = GaussianDiffusion(prediction="v")

    def model(x, t):
        return 0.3 * x + 0.1 * torch.sin(3 * x)

    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ddim = DDIMSampler(num_steps, eta=1.0, timestep_spacing="linspace")
    ddpm = DDPMSampler(num_steps)
    a = ddim(model, diffusion, x_T, generator=torch.Generator().manual_seed(8))
    b = ddpm(model, diffusion, x_T, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_timestep_spacings():
    assert DDIMSampler(50).timesteps(1000) == list(range(980, -1, -20))
    assert DDIMSampler(50, timestep_spacing="trailing").timesteps(1000) == list(range(999, 0, -20))
    assert DDPMSampler().timesteps(1000) == list(range(999, -1, -1))
    assert DDPMSampler(4).timesteps(1000) == [999, 666, 333, 0]
    for T, S in [(1000, 50), (1000, 7), (1000, 3), (1000, 999), (1000, 1000), (100, 30), (10, 4), (1000, 2)]:
        leading = (np.arange(0, S) * (T // S)).round()[::-1].astype(np.int64)
        trailing = np.round(np.arange(T, 0, -T / S)).astype(np.int64) - 1
        linspace = np.linspace(0, T - 1, S).round()[::-1].astype(np.int64)
        assert sampling_timesteps(T, S, "leading") == leading.tolist()
        assert sampling_timesteps(T, S, "trailing") == trailing.tolist()
        assert sampling_timesteps(T, S, "linspace") == linspace.tolist()
        for ts in (leading, trailing, linspace):
            assert len(set(ts.tolist())) == S and ts.min() >= 0 and ts.max() < T


def test_a_single_step_starts_at_the_noise_end():
    """numpy's (and diffusers') leading and linspace grids are [0] for one step; ours start at T - 1 in every spacing."""
    for spacing in ("leading", "trailing", "linspace"):
        assert sampling_timesteps(1000, 1, spacing) == [999]
        assert sampling_timesteps(10, 1, spacing) == [9]


def test_invalid_sampler_arguments():
    with pytest.raises(ValueError, match="leading"):
        DDIMSampler(10, timestep_spacing="karras")
    with pytest.raises(ValueError, match="num_steps"):
        DDIMSampler(1001).timesteps(1000)
    with pytest.raises(ValueError, match="num_steps"):
        DDPMSampler(0)


@pytest.mark.parametrize("sampler", [DDIMSampler(10, clip_x0=1.0), DDPMSampler(10, clip_x0=1.0)], ids=repr)
def test_clip_x0(sampler):
    diffusion = GaussianDiffusion(prediction="eps")
    x0 = torch.full((1, 2, 3), 3.0, dtype=torch.float64)
    x_T = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler(point_mass_denoiser(diffusion, x0), diffusion, x_T, generator=torch.Generator())
    torch.testing.assert_close(out, torch.ones_like(out))


@pytest.mark.parametrize("sampler", [DDIMSampler(10, eta=1.0), DDPMSampler(10)], ids=repr)
def test_stochastic_samplers_are_reproducible(sampler):
    diffusion = GaussianDiffusion()
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def model(x, t):
        return 0.5 * x

    def run(seed):
        return sampler(model, diffusion, x_T, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_ddim_eta_zero_is_deterministic_and_progress_bar_runs():
    diffusion = GaussianDiffusion()
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a = DDIMSampler(5)(lambda x, t: 0.5 * x, diffusion, x_T, generator=torch.Generator().manual_seed(1))
    b = DDIMSampler(5)(lambda x, t: 0.5 * x, diffusion, x_T, progress=True)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- guidance


@dataclass
class Cond:
    """Stand-in for the opaque conditioning dataclass (tokens + its own cat)."""

    tokens: torch.Tensor

    @staticmethod
    def cat(items: list[Cond]) -> Cond:
        return Cond(torch.cat([c.tokens for c in items]))


def toy_denoiser(calls: list):
    def denoiser(x, t, cond: Cond):
        calls.append(x.shape[0])
        return x * cond.tokens.reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1).to(x.dtype) / 1000

    return denoiser


def test_cfg_scale_one_or_no_uncond_is_the_conditional_call():
    x = torch.randn(3, 2, 4, 4)
    t = torch.tensor([1, 500, 999])
    cond, uncond = Cond(torch.tensor([2.0, 3.0, 4.0])), Cond(torch.zeros(3))
    calls: list = []
    denoiser = toy_denoiser(calls)
    expected = denoiser(x, t, cond)
    calls.clear()
    for fn in (
        classifier_free_guidance(denoiser, cond, uncond, 1.0, cat=Cond.cat),
        classifier_free_guidance(denoiser, cond, None, 7.5),
    ):
        assert torch.equal(fn(x, t), expected)
    assert calls == [3, 3]


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_cfg_combination_batched_and_unbatched(scale):
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 500, 999])
    cond, uncond = Cond(torch.tensor([2.0, 3.0, 4.0])), Cond(torch.full((3,), -1.0))
    expected_cond = x * torch.tensor([2.0, 3.0, 4.0]).reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / 1000
    expected_uncond = -x + t.reshape(-1, 1, 1, 1) / 1000
    expected = expected_uncond + scale * (expected_cond - expected_uncond)

    calls: list = []
    batched = classifier_free_guidance(toy_denoiser(calls), cond, uncond, scale, cat=Cond.cat)(x, t)
    assert calls == [6]
    calls.clear()
    unbatched = classifier_free_guidance(toy_denoiser(calls), cond, uncond, scale)(x, t)
    assert calls == [3, 3]
    torch.testing.assert_close(batched, expected)
    torch.testing.assert_close(unbatched, expected)


def test_sigma_at_reads_the_noise_level_of_the_network_time_input():
    vp = GaussianDiffusion(schedule="cosine", prediction="v", zero_terminal_snr=True)
    t = torch.tensor([0, 10, 500, 998])
    ab = vp.alphas_cumprod[t]
    torch.testing.assert_close(vp.sigma_at(vp.model_time(t)), ((1 - ab) / ab).sqrt())
    assert vp.sigma_at(vp.model_time(torch.tensor([999]))).item() == math.inf
    flow = RectifiedFlow(schedule_shift=3.0)
    s = flow.sigmas[t]
    torch.testing.assert_close(
        flow.sigma_at(flow.model_time(t)), s / (1 - s), rtol=1e-4, atol=0
    )  # float32 time
    # the same sigma as the Gaussian form of the process: sqrt((1 - alpha_bar) / alpha_bar)
    ab = flow.alphas_cumprod[t]
    torch.testing.assert_close(flow.sigma_at(flow.model_time(t)), ((1 - ab) / ab).sqrt(), rtol=1e-4, atol=0)


def test_guidance_interval_guides_only_inside_and_saves_the_calls_outside():
    diffusion = GaussianDiffusion()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    cond, uncond = Cond(torch.tensor([2.0, 3.0, 4.0])), Cond(torch.full((3,), -1.0))
    calls: list = []
    denoiser = toy_denoiser(calls)
    plain = classifier_free_guidance(denoiser, cond, uncond, 4.0, cat=Cond.cat)
    sigma = diffusion.sigma_at(torch.arange(1000))
    lo, hi = 0.5, 3.0
    inside_t = int(torch.nonzero((sigma > lo) & (sigma <= hi))[0])
    outside_t = 999  # sigma 14.6
    banded = classifier_free_guidance(
        denoiser, cond, uncond, 4.0, cat=Cond.cat, interval=(lo, hi), sigma_at=diffusion.sigma_at
    )
    for t, expected_calls in ((inside_t, [6]), (outside_t, [3])):
        tt = torch.full((3,), t)
        calls.clear()
        out = banded(x, tt)
        assert calls == expected_calls
        expected = plain(x, tt) if t == inside_t else denoiser(x, tt, cond)
        torch.testing.assert_close(out, expected)
    # one batch at two noise levels: each sample guided or not by its own
    tt = torch.tensor([inside_t, outside_t, inside_t])
    out = banded(x, tt)
    both = plain(x, tt)
    conditional = denoiser(x, tt, cond)
    torch.testing.assert_close(out[[0, 2]], both[[0, 2]])
    torch.testing.assert_close(out[1], conditional[1])
    with pytest.raises(ValueError, match="lo < hi"):
        classifier_free_guidance(
            denoiser, cond, uncond, 4.0, interval=(3.0, 1.0), sigma_at=diffusion.sigma_at
        )
    with pytest.raises(ValueError, match="needs sigma_at"):
        classifier_free_guidance(denoiser, cond, uncond, 4.0, interval=(0.0, 1.0))


@pytest.mark.parametrize("flow", [False, True])
def test_guidance_interval_in_a_sampler_guides_the_steps_of_its_band(flow):
    """DDIM over 20 steps with the interval: one batched (guided) call per step whose sigma is in the band, one
    plain call per other step; a band over every sigma samples exactly as unbanded guidance."""
    diffusion = RectifiedFlow() if flow else GaussianDiffusion()
    sampler = DDIMSampler(20, timestep_spacing="trailing")
    cond, uncond = Cond(torch.tensor([0.9, 1.1])), Cond(torch.full((2,), 0.5))
    x_T = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    calls: list = []

    def run(interval):
        calls.clear()
        model_fn = classifier_free_guidance(
            toy_denoiser(calls),
            cond,
            uncond,
            3.0,
            cat=Cond.cat,
            interval=interval,
            sigma_at=diffusion.sigma_at,
        )
        return sampler(model_fn, diffusion, x_T)

    sigmas = diffusion.sigma_at(diffusion.model_time(torch.tensor(sampler.timesteps(1000))))
    lo, hi = 0.3, 5.0
    run((lo, hi))
    in_band = [bool(lo < s <= hi) for s in sigmas]
    assert 0 < sum(in_band) < len(in_band)
    assert calls == [4 if inside else 2 for inside in in_band]
    torch.testing.assert_close(run((0.0, math.inf)), run(None))


def test_cfg_is_parameterization_invariant():
    """Guiding the eps output and converting to x0 equals guiding the x0s: the conversion is affine."""
    diffusion = GaussianDiffusion(prediction="eps")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([100, 900])
    out_c, out_u = torch.randn(2, *x.shape, generator=g, dtype=torch.float64)
    guided = classifier_free_guidance(lambda x, t, c: c, out_c, out_u, 5.0)(x, t)
    x0_c, x0_u = diffusion.to_x0_eps(out_c, x, t)[0], diffusion.to_x0_eps(out_u, x, t)[0]
    torch.testing.assert_close(diffusion.to_x0_eps(guided, x, t)[0], x0_u + 5.0 * (x0_c - x0_u))


def test_drop_conditioning():
    mask = drop_conditioning(100_000, 0.1, "cpu", generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (100_000,)
    assert mask.float().mean().item() == pytest.approx(0.1, abs=0.005)
    again = drop_conditioning(100_000, 0.1, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert not drop_conditioning(1000, 0.0, "cpu").any()
    assert drop_conditioning(1000, 1.0, "cpu").all()
    with pytest.raises(ValueError):
        drop_conditioning(4, 1.5, "cpu")


# ---------------------------------------------------------------- package boundary


def test_diffusion_imports_only_tensor_math():
    allowed = {"torch", "math", "einops", "dataclasses", "typing", "collections", "__future__", "tqdm", "ldm"}
    for path in Path(ldm.diffusion.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                if name.startswith("ldm"):
                    assert name.startswith("ldm.diffusion"), f"{path.name} imports {name}"


# ---------------------------------------------------------------- training timestep distribution


def test_logit_normal_timesteps_follow_their_cdf():
    """t = floor(T sigmoid(u)), u ~ N(m, s²): P(t <= k) = Phi((logit((k + 1) / T) - m) / s), checked against the
    empirical CDF of 200k draws (Kolmogorov–Smirnov bound at 1e-3 significance is 0.0044)."""
    m, s, steps = 0.5, 0.8, 1000
    diffusion = GaussianDiffusion(
        "cosine",
        steps,
        prediction="v",
        timestep_sampling="logit_normal",
        logit_normal_mean=m,
        logit_normal_std=s,
    )
    t = diffusion.sample_timesteps(200_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= steps - 1
    k = np.arange(steps - 1)
    logit = np.log((k + 1) / steps) - np.log1p(-(k + 1) / steps)
    cdf = np.array([0.5 * (1 + math.erf((x - m) / (s * math.sqrt(2)))) for x in logit])
    empirical = np.searchsorted(np.sort(t.numpy()), k, side="right") / len(t)
    assert np.abs(empirical - cdf).max() < 0.0044
    assert float((t > 500).float().mean()) > 0.6  # a positive mean puts more of the draws at the noisy end
    assert diffusion.describe()["timestep_sampling"] == "logit_normal"
    assert diffusion.describe()["logit_normal_mean"] == m


def test_uniform_timesteps_are_the_default_and_unchanged():
    diffusion = GaussianDiffusion("cosine", prediction="v")
    drawn = diffusion.sample_timesteps(64, "cpu", generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))
    assert "timestep_sampling" not in diffusion.describe()  # older checkpoints describe themselves as before
    with pytest.raises(
        ValueError, match="unknown timestep_sampling 'lognormal'; valid: uniform, logit_normal"
    ):
        GaussianDiffusion(timestep_sampling="lognormal")
    with pytest.raises(ValueError, match="logit_normal_std must be > 0"):
        GaussianDiffusion(timestep_sampling="logit_normal", logit_normal_std=0.0)
