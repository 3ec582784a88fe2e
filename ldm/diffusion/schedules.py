"""Noise schedules: the betas of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")


def make_betas(
    kind: str,
    num_timesteps: int,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    cosine_s: float = 0.008,
) -> torch.Tensor:
    """Return the (num_timesteps,) float64 betas of a named schedule.

    - ``"linear"``: ``linspace(beta_start, beta_end)`` (DDPM, Ho et al. 2020 sec. 4 uses 1e-4 .. 0.02).
    - ``"scaled_linear"``: ``linspace(sqrt(beta_start), sqrt(beta_end)) ** 2`` (Stable Diffusion / LDM defaults).
    - ``"cosine"``: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2)
      (Nichol & Dhariwal 2021, eq. 17), beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1) clipped at 0.999.
      ``beta_start`` / ``beta_end`` are ignored.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
        return betas.clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {kind!r}; valid kinds: {', '.join(SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last alpha_bar is exactly 0 (zero terminal SNR), Lin et al. 2024, Algorithm 1.

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged; the betas
    are recomputed from the rescaled alpha_bar (the last beta becomes 1).
    """
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def shift_schedule(betas: torch.Tensor, shift: float) -> torch.Tensor:
    """Betas of the same schedule with its log-SNR lowered by 2 log(shift) at every step (more noise for shift > 1).

    A higher resolution needs more noise for the same corruption: neighbouring pixels are more correlated, so at a
    given SNR an image at d px has its low frequencies destroyed about as little as one at d/2 px at 4× the SNR.
    Hoogeboom et al. 2023 ("simple diffusion", sec. 3.1) shift the schedule to

        log SNR_d(t) = log SNR_base(t) + 2 log(base / d),     i.e. shift = d / base,

    and SD3 (Esser et al. 2024, sec. 5.3.2) shifts timesteps by sqrt(m / n) for m / n times the pixels, which for
    rectified flow is the same log-SNR shift. With SNR = alpha_bar / (1 - alpha_bar):

        alpha_bar'_t = alpha_bar_t / (alpha_bar_t + shift² (1 - alpha_bar_t)),   beta'_t = 1 - alpha_bar'_t / alpha_bar'_{t-1}.

    alpha_bar = 0 (zero terminal SNR) stays 0; shift = 1 returns the betas unchanged.
    """
    if shift <= 0:
        raise ValueError(f"schedule shift must be > 0, got {shift}")
    if shift == 1.0:
        return betas
    ab = torch.cumprod(1.0 - betas.to(torch.float64), dim=0)
    shifted = ab / (ab + shift**2 * (1.0 - ab))
    return 1.0 - torch.cat([shifted[:1], shifted[1:] / shifted[:-1]])
