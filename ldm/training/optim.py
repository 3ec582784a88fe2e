"""AdamW with a linear warm-up, then constant or cosine decay: the `optim` config group."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class AdamWSettings:
    lr: float = 1e-4
    betas: Sequence[float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    decay: str = "constant"  # "constant" | "cosine" (to min_lr_ratio · lr at trainer.max_steps)
    min_lr_ratio: float = 0.0
    fused: bool | None = None  # None: torch's fused kernel where the parameters' device has one (CUDA, CPU)

    def __post_init__(self) -> None:
        if self.decay not in ("constant", "cosine"):
            raise ValueError(f"optim.decay must be 'constant' or 'cosine', got {self.decay!r}")

    def build(
        self, model: nn.Module, total_steps: int | None = None
    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
        groups = param_groups(model, self.weight_decay)
        fused = self.fused
        if fused is None:  # docs/benchmarks.md: 6.8× faster than the foreach loop for SD2's UNet on a CPU
            devices = {p.device.type for g in groups for p in g["params"]}
            fused = bool(devices) and devices <= {"cuda", "cpu"}
        optimizer = torch.optim.AdamW(
            groups,
            lr=self.lr,
            betas=tuple(self.betas),
            eps=self.eps,
            fused=fused,
        )
        # A fused AdamW announces that it unscales fp16 gradients itself, and Lightning then refuses gradient
        # clipping under mixed precision (bf16 included, which has no scaler). Ours takes unscaled gradients: an
        # fp16 GradScaler unscales them before the step (and so before clipping), bf16 and fp32 have nothing to undo.
        optimizer._step_supports_amp_scaling = False
        if self.decay == "cosine" and not (total_steps and total_steps > 0):
            raise ValueError("optim.decay=cosine needs trainer.max_steps > 0")
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor_fn(total_steps))

    def lr_factor_fn(self, total_steps: int | None):
        warmup, decay, floor = self.warmup_steps, self.decay, self.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if decay == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only; none on biases, norm scales and other 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ConfiguredOptimizer(L.Callback):
    """A resumed run trains with the optimizer settings its config gives now, not those restored from the
    checkpoint (torch's `load_state_dict` brings back every param group's lr, betas, eps and weight decay):
    a new `optim.lr`, or a new global batch under `lr_scaling`, takes effect at the step the run resumes at, and
    the LR schedule (rebuilt from the config anyway) keeps its position."""

    def __init__(self, settings: AdamWSettings) -> None:
        self.settings = settings

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s = self.settings
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                continue
            groups = scheduler.optimizer.param_groups
            if scheduler.base_lrs != [s.lr] * len(groups):
                log.info(
                    "optimizer: lr %s from the checkpoint, %s from the config: using the config's",
                    scheduler.base_lrs[0],
                    s.lr,
                )
            scheduler.base_lrs = [s.lr] * len(groups)
            for i, (group, rule) in enumerate(zip(groups, scheduler.lr_lambdas, strict=True)):
                group.update(
                    initial_lr=s.lr, lr=s.lr * rule(scheduler.last_epoch), betas=tuple(s.betas), eps=s.eps
                )
                group["weight_decay"] = (
                    s.weight_decay if i == 0 else 0.0
                )  # param_groups: decay, then no decay
