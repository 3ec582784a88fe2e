"""Moving averages of a model's weights, used for sampling and evaluation: the fixed-decay EMA (`EMA`) and the
power-function EMAs of post-hoc EMA (`PowerEMA`)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class _Averages(nn.Module):
    """What every average of a model shares: an update count kept as a buffer (saved, resumed) and mirrored on the
    host (no GPU sync per step), eval mode always, and the step that moves an averaged copy towards the model."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._host_updates: int | None = None

    @property
    def updates(self) -> int:
        """The updates so far (steps skipped for NaN/inf gradients do not count)."""
        if self._host_updates is None:  # first use, or a state dict was loaded
            self._host_updates = int(self.num_updates)
        return self._host_updates

    def _count_update(self) -> None:
        self._host_updates = self.updates + 1
        self.num_updates += 1

    @staticmethod
    def _copy(model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).requires_grad_(False).eval()

    @staticmethod
    @torch.no_grad()
    def _move_towards(
        average: nn.Module, params: list[torch.Tensor], model: nn.Module, weight: float
    ) -> None:
        """average ← average + weight · (model − average) for the float parameters (`params`, the model's, detached);
        buffers are copied."""
        torch._foreach_lerp_([p for p in average.parameters() if p.is_floating_point()], params, weight)
        for avg_b, b in zip(average.buffers(), model.buffers(), strict=True):
            avg_b.copy_(b)

    @staticmethod
    def _float_params(model: nn.Module) -> list[torch.Tensor]:
        return [p.detach() for p in model.parameters() if p.is_floating_point()]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_updates = None

    def train(self, mode: bool = True) -> _Averages:
        return super().train(False)  # averaged copies always run in eval mode


class EMA(_Averages):
    """Keeps `module`, an averaged copy of a model, updated with `update(model)` after each optimizer step.

    With `warmup` the decay grows as min(decay, (1 + n) / (10 + n)), n the updates before this one (TF's
    ExponentialMovingAverage with num_updates; CompVis' LitEma counts this one too, one update further on), so
    short runs are not dominated by the random init.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        self.module = self._copy(model)

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self._count_update()
        self._move_towards(self.module, self._float_params(model), model, 1.0 - decay)


class PowerEMA(_Averages):
    """Power-function EMAs of a model (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
    Diffusion Models", sec. 3.1), one averaged copy per exponent in `gammas`, for post-hoc EMA
    (`ldm.training.posthoc_ema`).

    After t updates, copy k is the average of the weights θ_1 … θ_t with weights ∝ τ^γ_k: each update is
    θ̂ ← β θ̂ + (1 − β) θ_t with β = (1 − 1/t)^(γ+1), so the first update copies the model and, unlike a fixed
    decay, the averaging window grows with the run: its length relative to the run (`sigma_rel`, the profile's
    standard deviation / t) stays the same. Weight τ's share is exactly (1 − β_τ) (τ/t)^(γ+1). `updates` is t,
    the time of the profiles.
    """

    def __init__(self, model: nn.Module, gammas: list[float]) -> None:
        super().__init__()
        if not gammas or any(g <= 0 for g in gammas):
            raise ValueError(f"power EMA exponents must be positive, got {gammas}")
        self.gammas = [float(g) for g in gammas]
        self.averages = nn.ModuleList(self._copy(model) for _ in self.gammas)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self._count_update()
        t = self.updates
        params = self._float_params(model)
        for gamma, average in zip(self.gammas, self.averages, strict=True):
            self._move_towards(average, params, model, 1.0 - (1.0 - 1.0 / t) ** (gamma + 1.0))
