"""Ancestral DDPM and DDIM samplers over a callable ``model_fn(x_t, t) -> network output``.

Both walk a descending subsequence of the training timesteps; the step after the last (smallest) timestep
uses alpha_bar_prev = 1, so the final sample is the predicted x0 (diffusers' ``set_alpha_to_one``).

Every sampler (here and in ``ldm.diffusion.k_samplers``) is called as
``sampler(model_fn, diffusion, noise, generator=None, progress=False, init=None)``: ``noise`` is x_T ~ N(0, I),
``init`` an optional ``InitImage`` (img2img strength, inpainting mask). They hold the state as the Gaussian
x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps and call the network through ``diffusion.predict``, which
gives it what its process feeds it: so ``RectifiedFlow`` (Gaussian up to that input's scale) runs on every sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ldm.diffusion.gaussian import GaussianDiffusion
from ldm.diffusion.init_image import InitImage

ModelFn = Callable[[Tensor, Tensor], Tensor]
SPACINGS = ("leading", "trailing", "linspace")


def sampling_timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading") -> list[int]:
    """Descending timesteps of a ``num_steps`` sampler over a ``num_timesteps`` schedule (as diffusers).

    - ``"leading"``: ``arange(S) * (T // S)`` (the DDIM paper; diffusers with steps_offset=0): T=1000, S=50 → 980 .. 0.
      Stable Diffusion adds 1 (CompVis make_ddim_timesteps, diffusers' SD pipelines: steps_offset=1), 981 .. 1.
    - ``"trailing"``: ``round(arange(T, 0, -T / S)) - 1`` (Lin et al. 2024, table 2): 999 .. 19, starts at T - 1.
    - ``"linspace"``: ``round(linspace(0, T - 1, S))``: both ends; also respaced DDPM (Nichol & Dhariwal sec. 4).

    A single step is ``[T - 1]`` in every spacing: it has to start from the noise end. (diffusers' "leading" and
    "linspace" give t = 0 there, a step that returns the initial noise almost unchanged.)
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    T, S = num_timesteps, num_steps
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    if S == 1:
        return [T - 1]
    if spacing == "leading":
        ts = [i * (T // S) for i in range(S)]
    elif spacing == "trailing":
        ts = [round(T * (S - i) / S) - 1 for i in range(S)]  # exact rationals, round-half-even as numpy
    else:  # linspace
        ts = [round(i * (T - 1) / (S - 1)) for i in range(S)]
    return sorted(ts, reverse=True)


def alphas_cumprod_list(diffusion: GaussianDiffusion) -> list[float]:
    return diffusion.alphas_cumprod.detach().to("cpu", torch.float64).tolist()


def with_progress(steps: list, progress: bool) -> Iterable:
    if progress:
        from tqdm.auto import tqdm

        return tqdm(steps, desc="sampling")
    return steps


def _begin(
    diffusion: GaussianDiffusion, timesteps: list[int], noise: Tensor, init: InitImage | None
) -> tuple[list[int], Tensor]:
    """The timesteps actually walked and the starting x_t: all of them from x_T = noise, or for an init image
    the last ``init.num_steps_to_run`` of them from the image's latents noised to the first one."""
    if init is None:
        return timesteps, noise
    timesteps = timesteps[len(timesteps) - init.num_steps_to_run(len(timesteps)) :]
    return timesteps, init.start(noise, alphas_cumprod_list(diffusion)[timesteps[0]])


def _steps(
    diffusion: GaussianDiffusion, timesteps: list[int], progress: bool
) -> Iterable[tuple[int, float, float]]:
    """(t, alpha_bar_t, alpha_bar_prev) for descending timesteps; alpha_bar_prev = 1 after the last."""
    ab = alphas_cumprod_list(diffusion)
    prev = [ab[t] for t in timesteps[1:]] + [1.0]
    return with_progress([(t, ab[t], ab_prev) for t, ab_prev in zip(timesteps, prev, strict=True)], progress)


def _predict(
    model_fn: ModelFn, diffusion: GaussianDiffusion, x: Tensor, t: int, ab: float, clip_x0: float | None
) -> tuple[Tensor, Tensor]:
    """Network output at (x, t) as (x0, eps); with clip_x0, x0 is clamped and eps recomputed to match it."""
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    x0, eps = diffusion.predict(model_fn, x, t_batch)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1.0 - ab)
    return x0, eps


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class DDPMSampler:
    """Ancestral sampling from the true posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020 eq. 6-7), with x0 from
    the network and the "fixed small" variance beta_tilde.

    ``num_steps=None`` walks all T steps. Otherwise the timesteps are evenly strided (``"linspace"`` spacing)
    and the betas recomputed for the subsequence, beta_t = 1 - alpha_bar_t / alpha_bar_prev
    (respaced DDPM, Nichol & Dhariwal 2021 sec. 4).
    """

    def __init__(self, num_steps: int | None = None, clip_x0: float | None = None):
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 or None, got {num_steps}")
        self.num_steps = num_steps
        self.clip_x0 = clip_x0

    def __repr__(self) -> str:
        return f"DDPMSampler(num_steps={self.num_steps}, clip_x0={self.clip_x0})"

    def timesteps(self, num_timesteps: int) -> list[int]:
        """Descending timesteps walked for a schedule of ``num_timesteps``."""
        num_steps = num_timesteps if self.num_steps is None else self.num_steps
        return sampling_timesteps(num_timesteps, num_steps, "linspace")

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
        timesteps, x = _begin(diffusion, self.timesteps(diffusion.num_timesteps), x_T, init)
        for t, ab, ab_prev in _steps(diffusion, timesteps, progress):
            x0, _ = _predict(model_fn, diffusion, x, t, ab, self.clip_x0)
            beta = 1.0 - ab / ab_prev
            # DDPM eq. 7: posterior mean coefficients and variance beta_tilde.
            coef_x0 = math.sqrt(ab_prev) * beta / (1.0 - ab)
            coef_xt = math.sqrt(1.0 - beta) * (1.0 - ab_prev) / (1.0 - ab)
            var = beta * (1.0 - ab_prev) / (1.0 - ab)
            x = coef_x0 * x0 + coef_xt * x
            if var > 0:
                x = x + math.sqrt(var) * _noise(x, generator)
            if init is not None:
                x = init.blend(x, x_T, ab_prev)
        return x


class DDIMSampler:
    """DDIM (Song et al. 2021 eq. 12), with sigma_t from eq. 16 scaled by ``eta``:

        x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z,
        sigma = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev).

    eta = 0 is deterministic; eta = 1 is the respaced ancestral DDPM step. alpha_bar_prev is that of the next
    timestep in the sequence, and 1 after the last. (diffusers takes t - T // S: the same for "leading", and for
    "trailing" when S divides T; otherwise that is a timestep the grid never visits.)
    """

    def __init__(
        self,
        num_steps: int = 50,
        eta: float = 0.0,
        clip_x0: float | None = None,
        timestep_spacing: str = "leading",
    ):
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {timestep_spacing!r}; valid: {', '.join(SPACINGS)}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.num_steps = num_steps
        self.eta = eta
        self.clip_x0 = clip_x0
        self.timestep_spacing = timestep_spacing

    def __repr__(self) -> str:
        return (
            f"DDIMSampler(num_steps={self.num_steps}, eta={self.eta}, clip_x0={self.clip_x0}, "
            f"timestep_spacing={self.timestep_spacing!r})"
        )

    def timesteps(self, num_timesteps: int) -> list[int]:
        """Descending timesteps walked for a schedule of ``num_timesteps``."""
        return sampling_timesteps(num_timesteps, self.num_steps, self.timestep_spacing)

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
        timesteps, x = _begin(diffusion, self.timesteps(diffusion.num_timesteps), x_T, init)
        for t, ab, ab_prev in _steps(diffusion, timesteps, progress):
            x0, eps = _predict(model_fn, diffusion, x, t, ab, self.clip_x0)
            sigma = self.eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
            x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * _noise(x, generator)
            if init is not None:
                x = init.blend(x, x_T, ab_prev)
        return x
