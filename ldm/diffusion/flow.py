"""Rectified flow (flow matching with straight paths), the objective of Stable Diffusion 3.

Liu et al. 2023 ("Flow straight and fast"), Lipman et al. 2023 ("Flow matching"), Esser et al. 2024 (SD3, sec. 2-3):

    x_s = (1 - s) x0 + s eps,    eps ~ N(0, I),  s in (0, 1],

and the network predicts the velocity along the straight path, v = dx_s / ds = eps - x0, trained with
||v_hat - v||^2 and s drawn logit-normal (SD3's default, Esser et al. 2024 eq. 19). Sampling integrates
dx/ds = v from s = 1 (pure noise) to 0.

Discrete, as diffusers trains and samples SD3: timestep t in [0, T) has s_t = (t + 1) / T, shifted as
s' = shift s / (1 + (shift - 1) s) (Esser et al. 2024, resolution-dependent shifting; it lowers the log-SNR by
2 log(shift), as ``schedules.shift_schedule`` does), and the network's time input is s_t T (a float: diffusers'
``FlowMatchEulerDiscreteScheduler`` timesteps), so the time embedding keeps naming the noise level under a shift.

It is the Gaussian process x_s / c_s = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps with
alpha_bar = (1 - s)^2 / c^2, c^2 = (1 - s)^2 + s^2, whose network is given c x_t. ``RectifiedFlow`` is therefore a
``GaussianDiffusion`` with that alpha_bar and its own network input, time input and parameterization: every sampler
in ``ldm.diffusion`` runs on it unchanged (they call ``predict``). DDIM with eta = 0 is then exactly the Euler
step x' = x + (s' - s) v of diffusers' ``FlowMatchEulerDiscreteScheduler``; with "linspace" or "trailing" spacing it
starts at s = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.gaussian import GaussianDiffusion


def flow_sigmas(num_timesteps: int, shift: float = 1.0) -> Tensor:
    """s_t = shift u / (1 + (shift - 1) u), u = (t + 1) / T, for t = 0 .. T - 1 (ascending, float64, s_{T-1} = 1)."""
    if shift <= 0:
        raise ValueError(f"schedule_shift must be > 0, got {shift}")
    u = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
    return shift * u / (1.0 + (shift - 1.0) * u)


class RectifiedFlow(GaussianDiffusion):
    """Rectified flow on ``num_timesteps`` discrete noise levels (module docstring); the network predicts v = eps - x0.

    Options as ``GaussianDiffusion`` where they mean the same: ``schedule_shift`` (resolution / the resolution
    trained at first; SD3 uses 3.0 at 1024 px), ``offset_noise``, ``timestep_sampling`` (default logit-normal,
    mean 0, std 1, as SD3), ``min_snr_gamma`` (the x0 loss weighted by min(SNR, gamma), SNR = ((1 - s) / s)^2;
    since x0 = x_s - s v, that is s^2 min(SNR, gamma) on the v loss).
    """

    prediction = "flow"
    schedule = "rectified_flow"
    zero_terminal_snr = True  # s = 1 at the last step: pure noise

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule_shift: float = 1.0,
        offset_noise: float = 0.0,
        min_snr_gamma: float | None = None,
        timestep_sampling: str = "logit_normal",
        logit_normal_mean: float = 0.0,
        logit_normal_std: float = 1.0,
    ):
        self._training_options(
            num_timesteps, offset_noise, min_snr_gamma, timestep_sampling, logit_normal_mean, logit_normal_std
        )
        self.schedule_shift = float(schedule_shift)
        s = flow_sigmas(num_timesteps, self.schedule_shift)
        scale = ((1.0 - s).square() + s.square()).sqrt()  # c_s: x_s = c_s x_t
        self._set_alphas_cumprod(((1.0 - s) / scale).square(), flow_sigma=s, input_scale=scale)

    def __repr__(self) -> str:
        return (
            f"RectifiedFlow(num_timesteps={self.num_timesteps}, schedule_shift={self.schedule_shift}, "
            f"timestep_sampling={self.timestep_sampling!r}, offset_noise={self.offset_noise}, "
            f"min_snr_gamma={self.min_snr_gamma})"
        )

    def describe(self) -> dict:
        return {
            "schedule": self.schedule,
            "num_timesteps": self.num_timesteps,
            "prediction": self.prediction,
            "schedule_shift": self.schedule_shift,
            "offset_noise": self.offset_noise,
            "min_snr_gamma": self.min_snr_gamma,
            "timestep_sampling": self.timestep_sampling,
            **(
                {"logit_normal_mean": self.logit_normal[0], "logit_normal_std": self.logit_normal[1]}
                if self.timestep_sampling == "logit_normal"
                else {}
            ),
        }

    @property
    def sigmas(self) -> Tensor:
        """s_t for t = 0 .. T - 1 (float64, CPU)."""
        return self._master["flow_sigma"]

    def model_input(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x_s = c_s x_t = (1 - s) x0 + s eps."""
        return self._coef("input_scale", t, x_t) * x_t

    def model_time(self, t: Tensor) -> Tensor:
        """s_t T, float32 (diffusers' flow-matching timesteps)."""
        t = torch.as_tensor(t, dtype=torch.long)
        return (self._buffers(t.device)["flow_sigma"][t] * self.num_timesteps).to(torch.float32)

    def sigma_at(self, time: Tensor) -> Tensor:
        """sigma = s / (1 - s) for the time input s T (inf at s = 1)."""
        s = time.to(torch.float64) / self.num_timesteps
        return s / (1.0 - s)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def to_x0_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """From v at x_s = c x_t: x0 = x_s - s v, eps = x_s + (1 - s) v."""
        v = model_output.to(x_t.dtype)
        x = self.model_input(x_t, t)
        s = self._coef("flow_sigma", t, x_t)
        return x - s * v, x + (1.0 - s) * v

    def from_x0_eps(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return eps - x0

    def loss_weights(self, t: Tensor) -> Tensor:
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device, dtype=torch.float32)
        s = self._buffers(t.device)["flow_sigma"][t]
        return torch.minimum((1.0 - s).square(), self.min_snr_gamma * s.square()).to(torch.float32)
