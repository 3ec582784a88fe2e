"""Moving averages of a model's weights, used for sampling and evaluation: the fixed-decay EMA (`EMA`) and the
power-function EMAs of post-hoc EMA (`PowerEMA`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_CHUNK = 1 << 26  # model weights converted to float32 at once for a 16-bit average (elements: 256 MB)


class _Averages(nn.Module):
    """What every average of a model shares: an update count kept as a buffer (saved, resumed) and mirrored on the
    host (no GPU sync per step), eval mode always, and the step that moves an averaged copy towards the model.

    Averaged 16-bit weights (`precision: bf16-true` converts the whole module) take each step in a float32 copy,
    rounded into the weights after it: in bf16 (8 significant bits) a step of 1e-4 of the distance to the model is
    below half a unit in the last place, and the average would never move. The weights, and so the state dict, stay
    16-bit (same names and dtypes as before; the averaged copy runs in the model's dtype). The float32 copies
    (4 bytes a weight, per average) are not saved: they restart from the 16-bit weights after a load (a resume),
    a move or a copy, which costs one bf16 rounding, not the average.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._host_updates: int | None = None
        # averaged copy → [(float32 accumulator, the weight's `_version` after our write)] of its 16-bit weights
        self._accumulators: dict[int, list[tuple[torch.Tensor, int]]] = {}

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

    @torch.no_grad()
    def _move_towards(
        self, key: int, average: nn.Module, params: list[torch.Tensor], model: nn.Module, weight: float
    ) -> None:
        """average ← average + weight · (model − average) for the float parameters (`params`, the model's, detached);
        buffers are copied. `key` names the averaged copy (its float32 accumulators, for 16-bit weights)."""
        pairs = list(zip((p for p in average.parameters() if p.is_floating_point()), params, strict=True))
        full = [(a, p) for a, p in pairs if a.dtype not in _LOW_PRECISION]
        if full:
            torch._foreach_lerp_([a for a, _ in full], [p for _, p in full], weight)
        low = [(a, p) for a, p in pairs if a.dtype in _LOW_PRECISION]
        if low:
            self._move_16bit(key, low, weight)
        for avg_b, b in zip(average.buffers(), model.buffers(), strict=True):
            avg_b.copy_(b)

    def _move_16bit(self, key: int, pairs: list[tuple[torch.Tensor, torch.Tensor]], weight: float) -> None:
        """The step for 16-bit averaged weights (with the model's, `pairs`), in their float32 accumulators. One
        restarts from its weight when something else wrote the weight since our last step (a load bumps the
        weight's `_version`); the model's weights go to float32 a chunk at a time (a transient copy)."""
        saved = self._accumulators.get(key, [])
        if len(saved) != len(pairs):
            saved = [None] * len(pairs)
        accumulators = [
            entry[0]
            if entry is not None and entry[1] == a._version and entry[0].shape == a.shape
            else a.detach().float()
            for entry, (a, _) in zip(saved, pairs, strict=True)
        ]
        first, size = 0, 0
        for i, (_, p) in enumerate(pairs):
            size += p.numel()
            if size >= _CHUNK or i == len(pairs) - 1:
                chunk = range(first, i + 1)
                accs = [accumulators[j] for j in chunk]
                torch._foreach_lerp_(accs, [pairs[j][1].float() for j in chunk], weight)
                torch._foreach_copy_([pairs[j][0] for j in chunk], accs)
                first, size = i + 1, 0
        self._accumulators[key] = [(acc, a._version) for acc, (a, _) in zip(accumulators, pairs, strict=True)]

    @staticmethod
    def _float_params(model: nn.Module) -> list[torch.Tensor]:
        return [p.detach() for p in model.parameters() if p.is_floating_point()]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_updates = None
        self._accumulators.clear()

    def _apply(self, fn, recurse: bool = True):
        self._accumulators.clear()  # moved or cast (.to, .cuda, a precision plugin): restart from the weights
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_accumulators": {}}  # deepcopy, pickle: rebuilt from the weights

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
        self._move_towards(0, self.module, self._float_params(model), model, 1.0 - decay)


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
        for k, (gamma, average) in enumerate(zip(self.gammas, self.averages, strict=True)):
            self._move_towards(k, average, params, model, 1.0 - (1.0 - 1.0 / t) ** (gamma + 1.0))
