"""Euler, Euler-ancestral, Heun and DPM-Solver++(2M) on the discrete VP schedule, in k-diffusion's variables.

A VP model is a denoiser of x = x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps, sigma_t = sqrt((1 - alpha_bar_t) /
alpha_bar_t) (Karras et al. 2022, sec. 2 and appendix C.3.1):

    D(x, sigma_t) = x0 predicted by model_fn(x / sqrt(1 + sigma_t^2), t)   (through ``diffusion.predict``),

and the probability-flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma (ibid. eq. 3 with sigma(t) = t). The
samplers below integrate it (or the matching SDE) over a descending list of sigmas that ends at 0, as
k-diffusion's ``sampling.py`` and diffusers' Euler / Heun / DPMSolverMultistep schedulers do.

Every sigma walked is one of the T training sigmas, so the network is only called at the integer timesteps it
was trained on. Karras sigmas (ibid. eq. 5) are rounded to the nearest training sigma in log space (k-diffusion's
``DiscreteSchedule`` with ``quantize=True``); repeats are dropped, so at many steps a Karras schedule may take a
few steps fewer than asked. Under a zero-terminal-SNR schedule sigma_{T-1} is infinite; it is taken as
1 / sqrt(2^-24) ~ 4096, as diffusers does.

``sigma_max`` caps where sampling starts. The cosine schedule's clipped betas put sigma_{T-1} at ~20000 (SD's
scaled-linear schedule: 14.6). From there a Heun step to the next grid point extrapolates a slope difference
over a ~20000-wide interval, and Karras sigmas spend most of their steps above sigma = 100, where the sample is
still pure noise; both then miss the target badly. Starting at the largest training sigma <= 80 (the EDM
models' sigma_max) instead changes the start by a signal-to-noise ratio of at most 1/6400.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ldm.diffusion.gaussian import GaussianDiffusion
from ldm.diffusion.init_image import InitImage
from ldm.diffusion.samplers import SPACINGS, ModelFn, alphas_cumprod_list, sampling_timesteps, with_progress

MIN_ALPHA_BAR = 2.0**-24  # stands in for alpha_bar = 0 at the last step of a zero-terminal-SNR schedule

Denoise = Callable[[Tensor, int], Tensor]  # (x, index into sigmas) -> D(x, sigmas[index])


def discrete_sigmas(diffusion: GaussianDiffusion) -> list[float]:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0 .. T - 1 (ascending). Only alpha_bar = 0 (zero
    terminal SNR, rectified flow at s = 1) is replaced by MIN_ALPHA_BAR; a small positive alpha_bar (the clipped
    cosine schedule's 2.4e-9 at T - 1) keeps its sigma, the noise level the network is told by its timestep."""
    alphas_cumprod = (a if a > 0 else MIN_ALPHA_BAR for a in alphas_cumprod_list(diffusion))
    return [math.sqrt((1.0 - a) / a) for a in alphas_cumprod]


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> list[float]:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    if n == 1:
        return [sigma_max]
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return [(hi + i / (n - 1) * (lo - hi)) ** rho for i in range(n)]


class SigmaSampler:
    """Shared set-up: timesteps → sigmas, the denoiser D(x, sigma), img2img start and inpainting replacement.

    ``timestep_spacing`` picks the training timesteps as ``sampling_timesteps`` does ("linspace", diffusers'
    default for these schedulers, walks from T - 1 down to 0); ``karras=True`` replaces them by Karras sigmas
    between sigma_0 and sigma_{T-1}. ``sigma_max`` (None: no cap) replaces the timesteps whose sigma exceeds it
    by the largest training timestep whose sigma does not.
    """

    def __init__(
        self,
        num_steps: int = 20,
        karras: bool = False,
        timestep_spacing: str = "linspace",
        rho: float = 7.0,
        sigma_max: float | None = None,
    ):
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if sigma_max is not None and sigma_max <= 0:
            raise ValueError(f"sigma_max must be > 0, got {sigma_max}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {timestep_spacing!r}; valid: {', '.join(SPACINGS)}")
        self.num_steps, self.karras, self.timestep_spacing, self.rho = (
            num_steps,
            karras,
            timestep_spacing,
            rho,
        )
        self.sigma_max = sigma_max

    def __repr__(self) -> str:
        cap = "" if self.sigma_max is None else f", sigma_max={self.sigma_max}"
        return (
            f"{type(self).__name__}(num_steps={self.num_steps}, karras={self.karras}, "
            f"timestep_spacing={self.timestep_spacing!r}{cap})"
        )

    def timesteps(self, diffusion: GaussianDiffusion) -> list[int]:
        """Descending training timesteps whose sigmas are walked (then sigma = 0)."""
        table = discrete_sigmas(diffusion)
        top = len(table) - 1  # the largest timestep allowed to start from
        if self.sigma_max is not None:
            top = max([t for t, sigma in enumerate(table) if sigma <= self.sigma_max], default=0)
        if not self.karras:
            steps = sampling_timesteps(diffusion.num_timesteps, self.num_steps, self.timestep_spacing)
            capped = [min(t, top) for t in steps]
            return [t for i, t in enumerate(capped) if i == 0 or t != capped[i - 1]]
        log_sigmas = [math.log(s) for s in table[: top + 1]]
        out: list[int] = []
        for sigma in karras_sigmas(
            math.exp(log_sigmas[0]), math.exp(log_sigmas[-1]), self.num_steps, self.rho
        ):
            target = math.log(sigma)
            t = min(range(len(log_sigmas)), key=lambda i: abs(log_sigmas[i] - target))  # noqa: B023
            if not out or t != out[-1]:
                out.append(t)
        return out

    @torch.no_grad()
    def __call__(
        self,
        model_fn: ModelFn,
        diffusion: GaussianDiffusion,
        x_T: Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
        init: InitImage | None = None,
    ) -> Tensor:
        timesteps = self.timesteps(diffusion)
        if init is not None:
            timesteps = timesteps[len(timesteps) - init.num_steps_to_run(len(timesteps)) :]
        table = discrete_sigmas(diffusion)
        sigmas = [table[t] for t in timesteps] + [0.0]
        x_t = x_T if init is None else init.start(x_T, 1.0 / (1.0 + sigmas[0] ** 2))
        x = x_t * math.sqrt(1.0 + sigmas[0] ** 2)

        def denoise(x: Tensor, i: int) -> Tensor:
            t = torch.full((x.shape[0],), timesteps[i], device=x.device, dtype=torch.long)
            x_in = x / math.sqrt(1.0 + sigmas[i] ** 2)
            return diffusion.predict(model_fn, x_in, t)[0]

        state: dict = {}
        for i in with_progress(list(range(len(timesteps))), progress):
            x = self.step(denoise, x, sigmas, i, generator, state)
            if init is not None:
                x = init.blend_sigma(x, x_T, sigmas[i + 1])
        return x

    def step(
        self,
        denoise: Denoise,
        x: Tensor,
        sigmas: list[float],
        i: int,
        generator: torch.Generator | None,
        state: dict,
    ) -> Tensor:
        """x at sigmas[i] → x at sigmas[i + 1]; ``state`` persists over the steps of one call (multistep)."""
        raise NotImplementedError


class EulerSampler(SigmaSampler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without the Heun correction):
    x' = D + (sigma' / sigma)(x - D). With the same timesteps this is exactly DDIM with eta = 0 (Song et al. 2021,
    eq. 13 is Euler in (x_t / sqrt(alpha_bar), sigma)). One model call per step."""

    def step(self, denoise, x, sigmas, i, generator, state):
        d = denoise(x, i)
        return d + (sigmas[i + 1] / sigmas[i]) * (x - d)


class EulerAncestralSampler(SigmaSampler):
    """Euler step down to sigma_down, then fresh noise of std sigma_up (k-diffusion ``sample_euler_ancestral``):
    sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)), sigma_down = sqrt(sigma'^2 - sigma_up^2).
    With eta = 1 and the same timesteps and noise this is DDIM with eta = 1, i.e. ancestral DDPM."""

    def __init__(self, num_steps: int = 20, eta: float = 1.0, **kwargs):
        super().__init__(num_steps, **kwargs)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta

    def step(self, denoise, x, sigmas, i, generator, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma_up = min(s_next, self.eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        sigma_down = math.sqrt(s_next**2 - sigma_up**2)
        d = denoise(x, i)
        x = d + (sigma_down / s) * (x - d)
        if sigma_up > 0:
            x = x + sigma_up * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x


class HeunSampler(SigmaSampler):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1, no churn): an Euler step, then the average of
    the slopes at both ends. The step to sigma = 0 is a plain Euler step. 2 * num_steps - 1 model calls."""

    def step(self, denoise, x, sigmas, i, generator, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, i)
        if s_next == 0:
            return d
        slope = (x - d) / s
        x_euler = x + (s_next - s) * slope
        slope_next = (x_euler - denoise(x_euler, i + 1)) / s_next
        return x + (s_next - s) * (slope + slope_next) / 2


class DPMSolverPP2MSampler(SigmaSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), as k-diffusion's ``sample_dpmpp_2m``: with
    lambda = -log sigma and h = lambda' - lambda, x' = (sigma' / sigma) x - expm1(-h) D', where D' is the
    denoised estimate extrapolated from the last two, D' = (1 + 1 / 2r) D_i - (1 / 2r) D_{i-1}, r = h_{i-1} / h.
    The first step is first order (DDIM) and so is the last, to sigma = 0 (x = D). One model call per step.

    Use it with Karras sigmas. Its default spacing is "trailing" (diffusers' DPMSolverMultistep also never visits
    t = 0): on the "linspace" grid, whose last interval (T / S down to 0) is far longer in log sigma than the one
    before, the extrapolation 1 / 2r blows up and the error stops falling with the steps.
    """

    def __init__(
        self,
        num_steps: int = 20,
        karras: bool = False,
        timestep_spacing: str = "trailing",
        rho: float = 7.0,
        sigma_max: float | None = None,
    ):
        super().__init__(
            num_steps, karras=karras, timestep_spacing=timestep_spacing, rho=rho, sigma_max=sigma_max
        )

    def step(self, denoise, x, sigmas, i, generator, state):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, i)
        previous, state["previous"] = state.get("previous"), d
        if s_next == 0:
            return d
        h = math.log(s / s_next)
        if previous is not None:
            r = math.log(sigmas[i - 1] / s) / h
            d = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * previous
        return (s_next / s) * x - math.expm1(-h) * d
