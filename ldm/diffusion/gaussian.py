"""Gaussian diffusion: forward process, parameterizations (eps / v / x0) and the training loss.

Notation (Ho et al. 2020): alpha_bar_t = prod_{s <= t} (1 - beta_s), and the forward marginal (DDPM eq. 4)

    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,    eps ~ N(0, I).

Timesteps are 0-based long tensors in [0, T): index t here is step t + 1 of the paper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.schedules import make_betas, rescale_zero_terminal_snr, shift_schedule

PREDICTIONS = ("eps", "v", "x0")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


@dataclass
class DiffusionLoss:
    loss: Tensor  # scalar mean over the batch
    per_sample: Tensor  # (B,) MSE per sample, mean over the non-batch dims (unweighted)
    t: Tensor  # (B,) long timesteps used
    weights: Tensor  # (B,) loss weight of each sample (ones unless min-SNR-gamma weighting is on)


def broadcast_to(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample coefficients (B,) (or a scalar) to (B, 1, ..., 1) so they broadcast against x."""
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


class GaussianDiffusion:
    """Forward process and parameterization conversions for a discrete-time Gaussian diffusion.

    The network is a callable ``model_fn(x_t, t) -> output``; ``prediction`` says what the output means:

    - ``"eps"``: the noise (DDPM eq. 11-12).
    - ``"v"``: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, sec. 4 / appendix D).
    - ``"x0"``: the clean data.

    Training options (each off by default; the config node carries them, so checkpoints remember them):

    - ``zero_terminal_snr``: rescale the schedule so alpha_bar_{T-1} = 0 (Lin et al. 2024, Algorithm 1). The
      last step is then pure noise, where eps cannot be turned into x0: use v (or x0) prediction (ibid. sec. 3.2).
    - ``offset_noise``: training noise eps + offset * eps_c, eps_c ~ N(0, I) per sample and channel, constant
      over space (Guttenberg 2023), so the model can change an image's mean brightness.
    - ``min_snr_gamma``: weight the loss by min(SNR, gamma) in x0 terms (Hang et al. 2023, eq. 11-12).
    - ``schedule_shift``: lower the log-SNR of every step by 2 log(shift), shift = resolution / the resolution the
      schedule was made for (Hoogeboom et al. 2023; `schedules.shift_schedule`): for training at 512 or 1024 px.
    - ``timestep_sampling``: how training draws t. ``"uniform"`` over [0, T) (DDPM), or ``"logit_normal"``:
      t = floor(T sigmoid(u)), u ~ N(logit_normal_mean, logit_normal_std^2) (Esser et al. 2024, sec. 3.1, eq. 19),
      which spends more steps on the middle noise levels and fewer on the nearly clean and nearly pure-noise ends;
      a positive mean moves the weight towards noise.

    Schedule tensors are kept in float64 and cast to x's dtype and device where they are used, with a cached
    copy per device, so the methods work with inputs on any device without calling ``to``.
    """

    def __init__(
        self,
        schedule: str = "scaled_linear",
        num_timesteps: int = 1000,
        prediction: str = "eps",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
        offset_noise: float = 0.0,
        min_snr_gamma: float | None = None,
        schedule_shift: float = 1.0,
        timestep_sampling: str = "uniform",
        logit_normal_mean: float = 0.0,
        logit_normal_std: float = 1.0,
    ):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if zero_terminal_snr and prediction == "eps":
            raise ValueError(
                "zero_terminal_snr with eps prediction: at the last step x_t is pure noise and eps says nothing "
                "about x0; use prediction=v (Lin et al. 2024, sec. 3.2)"
            )
        self.schedule = schedule
        self.prediction = prediction
        self.zero_terminal_snr = zero_terminal_snr
        self._training_options(
            num_timesteps, offset_noise, min_snr_gamma, timestep_sampling, logit_normal_mean, logit_normal_std
        )
        betas = make_betas(schedule, num_timesteps, beta_start=beta_start, beta_end=beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.schedule_shift = float(schedule_shift)
        betas = shift_schedule(betas, self.schedule_shift)  # log SNR − 2 log(shift); 1 = unchanged
        self._set_alphas_cumprod(torch.cumprod(1.0 - betas, dim=0), betas=betas)

    def _training_options(
        self,
        num_timesteps: int,
        offset_noise: float,
        min_snr_gamma: float | None,
        timestep_sampling: str,
        logit_normal_mean: float,
        logit_normal_std: float,
    ) -> None:
        """Check and keep the options every process shares (number of steps, noise, weighting, t sampling)."""
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if offset_noise < 0:
            raise ValueError(f"offset_noise must be >= 0, got {offset_noise}")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or null, got {min_snr_gamma}")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"unknown timestep_sampling {timestep_sampling!r}; valid: {', '.join(TIMESTEP_SAMPLING)}"
            )
        if logit_normal_std <= 0:
            raise ValueError(f"logit_normal_std must be > 0, got {logit_normal_std}")
        self.num_timesteps = num_timesteps
        self.offset_noise = offset_noise
        self.min_snr_gamma = min_snr_gamma
        self.timestep_sampling = timestep_sampling
        self.logit_normal = (float(logit_normal_mean), float(logit_normal_std))

    def _set_alphas_cumprod(
        self, alphas_cumprod: Tensor, betas: Tensor | None = None, **extra: Tensor
    ) -> None:
        """Keep the schedule (float64 CPU masters; per-device copies are made once and cached, see _buffers).
        ``betas`` default to 1 - alpha_bar_t / alpha_bar_{t-1}; ``extra``: more per-timestep tables for ``_coef``."""
        alphas_cumprod = alphas_cumprod.to(torch.float64)
        if betas is None:
            betas = 1.0 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        self._master = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            **{k: v.to(torch.float64) for k, v in extra.items()},
        }
        self._cache: dict[torch.device, dict[str, Tensor]] = {}
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(schedule={self.schedule!r}, num_timesteps={self.num_timesteps}, "
            f"prediction={self.prediction!r}, zero_terminal_snr={self.zero_terminal_snr}, "
            f"offset_noise={self.offset_noise}, min_snr_gamma={self.min_snr_gamma})"
        )

    def describe(self) -> dict:
        """What a checkpoint records about how its model was trained."""
        return {
            "schedule": self.schedule,
            "num_timesteps": self.num_timesteps,
            "prediction": self.prediction,
            "zero_terminal_snr": self.zero_terminal_snr,
            "offset_noise": self.offset_noise,
            "min_snr_gamma": self.min_snr_gamma,
            # resolution / base resolution of a progressive-resolution run; recorded only when on
            **({"schedule_shift": self.schedule_shift} if self.schedule_shift != 1.0 else {}),
            # how training drew t; recorded only when not uniform
            **(
                {
                    "timestep_sampling": self.timestep_sampling,
                    "logit_normal_mean": self.logit_normal[0],
                    "logit_normal_std": self.logit_normal[1],
                }
                if self.timestep_sampling != "uniform"
                else {}
            ),
        }

    def _buffers(self, device: torch.device) -> dict[str, Tensor]:
        """Schedule tensors on ``device``: float64, or float32 on MPS (which has no float64)."""
        if device not in self._cache:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._cache[device] = {k: v.to(device=device, dtype=dtype) for k, v in self._master.items()}
        return self._cache[device]

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        """Put ``betas`` and ``alphas_cumprod`` on ``device``. Optional: the methods follow their inputs' device."""
        buffers = self._buffers(torch.device(device))
        self.betas, self.alphas_cumprod = buffers["betas"], buffers["alphas_cumprod"]
        return self

    def _coef(self, name: str, t: Tensor | int, x: Tensor) -> Tensor:
        """Gather schedule tensor ``name`` at timesteps t, as x's dtype/device, broadcastable to x."""
        t = torch.as_tensor(t, device=x.device, dtype=torch.long)
        return broadcast_to(self._buffers(x.device)[name][t].to(x.dtype), x)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (DDPM eq. 4)."""
        return (
            self._coef("sqrt_alphas_cumprod", t, x0) * x0
            + self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to output at (x_t, t) in this parameterization."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        # v-prediction, Salimans & Ho 2022 eq. (in sec. 4): v = alpha_t eps - sigma_t x0.
        return (
            self._coef("sqrt_alphas_cumprod", t, x0) * noise
            - self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        )

    def to_x0_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Convert a network output in ``self.prediction`` to the implied (x0, eps) at (x_t, t).

        eps: x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)                      (DDPM eq. 4 inverted)
        x0:  eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
        v:   x0 = sqrt(ab) x_t - sqrt(1 - ab) v,  eps = sqrt(1 - ab) x_t + sqrt(ab) v   (Salimans & Ho 2022)
        """
        model_output = model_output.to(x_t.dtype)
        a = self._coef("sqrt_alphas_cumprod", t, x_t)
        s = self._coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        if self.prediction == "eps":
            eps = model_output
            return (x_t - s * eps) / a, eps
        if self.prediction == "x0":
            x0 = model_output
            return x0, (x_t - a * x0) / s
        v = model_output
        return a * x_t - s * v, s * x_t + a * v

    def model_input(self, x_t: Tensor, t: Tensor) -> Tensor:
        """What the network is given for x_t, the state written as above (``q_sample``): x_t itself here. A
        process whose network sees another scaling of it (``RectifiedFlow``) says so by overriding this."""
        return x_t

    def model_time(self, t: Tensor) -> Tensor:
        """The time input the network is given for timesteps t: the integer t itself here."""
        return t

    def sigma_at(self, time: Tensor) -> Tensor:
        """The noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) (k-diffusion's; inf at alpha_bar = 0) of a
        network time input ``model_time(t)``, float64: what the guided network can tell its noise level by."""
        ab = self._buffers(time.device)["alphas_cumprod"][torch.as_tensor(time, dtype=torch.long)]
        return ((1.0 - ab) / ab).sqrt().to(torch.float64)

    def predict(
        self, model_fn: Callable[[Tensor, Tensor], Tensor], x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Call the network at (x_t, t), as every sampler does, and return the (x0, eps) it implies."""
        return self.to_x0_eps(model_fn(self.model_input(x_t, t), self.model_time(t)), x_t, t)

    def from_x0_eps(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The network output in ``self.prediction`` that implies (x0, eps) at t: the inverse of ``to_x0_eps``."""
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        return (
            self._coef("sqrt_alphas_cumprod", t, x0) * eps
            - self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        )

    def training_noise(
        self, shape: torch.Size, device, dtype, generator: torch.Generator | None = None
    ) -> Tensor:
        """eps ~ N(0, I), plus ``offset_noise`` * N(0, 1) per (sample, channel) when offset noise is on."""
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        if self.offset_noise > 0:
            offset_shape = tuple(shape[:2]) + (1,) * (len(shape) - 2)
            noise = noise + self.offset_noise * torch.randn(
                offset_shape, generator=generator, device=device, dtype=dtype
            )
        return noise

    def loss_weights(self, t: Tensor) -> Tensor:
        """Per-sample loss weights (B,), float32: min-SNR-gamma (Hang et al. 2023) or ones.

        The x0 loss is weighted by min(SNR, gamma). The eps and v losses equal SNR and SNR + 1 times the x0 loss
        (for the same x0 error), so they are weighted by min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1).
        """
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device, dtype=torch.float32)
        snr = self._buffers(t.device)["alphas_cumprod"][t]
        snr = snr / (1.0 - snr)
        gamma = self.min_snr_gamma
        if self.prediction == "x0":
            w = snr.clamp(max=gamma)
        elif self.prediction == "eps":
            w = (gamma / snr).clamp(max=1.0)  # min(SNR, gamma) / SNR, finite at SNR = 0
        else:
            w = snr.clamp(max=gamma) / (snr + 1.0)
        return w.to(torch.float32)

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> Tensor:
        """Long timesteps in [0, T) for training: uniform (DDPM Algorithm 1) or logit-normal (``timestep_sampling``).
        The generator must live on ``device``."""
        if self.timestep_sampling == "logit_normal":
            mean, std = self.logit_normal
            u = torch.randn(batch_size, device=device, generator=generator) * std + mean
            t = (torch.sigmoid(u) * self.num_timesteps).floor().long()
            return t.clamp(max=self.num_timesteps - 1)
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def loss(
        self,
        model_fn: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DiffusionLoss:
        """Simple loss (DDPM eq. 14, generalized to the chosen parameterization): ||model_fn(x_t, t) - target||^2,
        each sample weighted by ``loss_weights(t)``.

        t and noise are drawn with ``generator`` (on x0's device) when not given (noise with the offset, if on). The squared error is taken
        in at least float32, so a bf16 network output is compared in full precision.
        """
        b = x0.shape[0]
        if t is None:
            t = self.sample_timesteps(b, x0.device, generator=generator)
        if noise is None:
            noise = self.training_noise(x0.shape, x0.device, x0.dtype, generator=generator)
        x_t = self.q_sample(x0, t, noise)
        output = model_fn(self.model_input(x_t, t), self.model_time(t))
        target = self.target(x0, noise, t)
        dtype = torch.promote_types(torch.promote_types(output.dtype, target.dtype), torch.float32)
        per_sample = (output.to(dtype) - target.to(dtype)).square().reshape(b, -1).mean(dim=1)
        weights = self.loss_weights(t).to(per_sample.dtype)
        return DiffusionLoss(loss=(weights * per_sample).mean(), per_sample=per_sample, t=t, weights=weights)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021), float32 on t's device."""
        t = torch.as_tensor(t, dtype=torch.long)
        ab = self._buffers(t.device)["alphas_cumprod"][t]
        return (ab / (1.0 - ab)).to(torch.float32)
