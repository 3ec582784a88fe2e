"""Exponential moving average of a model's weights, used for sampling and evaluation."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Keeps `module`, an averaged copy of a model, updated with `update(model)` after each optimizer step.

    With `warmup` the decay grows as min(decay, (1 + n) / (10 + n)) (the schedule of CompVis' LitEma and
    TF's ExponentialMovingAverage with num_updates), so short runs are not dominated by the random init.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._host_updates: int | None = None  # num_updates mirrored on the host: no GPU sync per step

    def current_decay(self) -> float:
        if self._host_updates is None:  # first use, or a state dict was loaded
            self._host_updates = int(self.num_updates)
        n = self._host_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        self._host_updates += 1
        ema_params = [p for p in self.module.parameters() if p.is_floating_point()]
        params = [p.detach() for p in model.parameters() if p.is_floating_point()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_updates = None

    def train(self, mode: bool = True) -> EMA:
        return super().train(False)  # the averaged copy always runs in eval mode


class PowerEMA(nn.Module):
    """Power-function EMAs of a model (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
    Diffusion Models", sec. 3.1), one averaged copy per exponent in `gammas`, for post-hoc EMA
    (`ldm.training.posthoc_ema`).

    After t updates, copy k is the average of the weights θ_1 … θ_t with weights ∝ τ^γ_k: each update is
    θ̂ ← β θ̂ + (1 − β) θ_t with β = (1 − 1/t)^(γ+1), so the first update copies the model and, unlike a fixed
    decay, the averaging window grows with the run: its length relative to the run (`sigma_rel`, the profile's
    standard deviation / t) stays the same. Weight τ's share is exactly (1 − β_τ) (τ/t)^(γ+1).
    """

    def __init__(self, model: nn.Module, gammas: list[float]) -> None:
        super().__init__()
        if not gammas or any(g <= 0 for g in gammas):
            raise ValueError(f"power EMA exponents must be positive, got {gammas}")
        self.gammas = [float(g) for g in gammas]
        self.averages = nn.ModuleList(copy.deepcopy(model).requires_grad_(False).eval() for _ in self.gammas)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._host_updates: int | None = None  # num_updates mirrored on the host: no GPU sync per step

    @property
    def updates(self) -> int:
        """t: the updates so far (the time of the profiles; steps skipped for NaN/inf gradients do not count)."""
        if self._host_updates is None:
            self._host_updates = int(self.num_updates)
        return self._host_updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        t = self.updates + 1
        params = [p.detach() for p in model.parameters() if p.is_floating_point()]
        for gamma, average in zip(self.gammas, self.averages, strict=True):
            beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
            torch._foreach_lerp_(
                [p for p in average.parameters() if p.is_floating_point()], params, 1.0 - beta
            )
            for avg_b, b in zip(average.buffers(), model.buffers(), strict=True):
                avg_b.copy_(b)
        self.num_updates += 1
        self._host_updates = t

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_updates = None

    def train(self, mode: bool = True) -> PowerEMA:
        return super().train(False)
