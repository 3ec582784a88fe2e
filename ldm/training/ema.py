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
