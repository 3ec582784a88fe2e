"""Optimizer steps whose gradients hold NaN or inf are skipped and counted; when they persist, the run stops.

A single bad batch (an overflow in bf16, an extreme sample) should cost one step, not the run: the step is taken with
no gradients, so AdamW leaves the weights and its moments as they were (torch's AdamW skips a parameter without a
gradient, step count included) and the EMA is not updated. The step still counts (global step, LR schedule, data
position). More than `limit` skipped steps in a row mean the run has diverged rather than met a bad batch: the
module asks the Trainer to stop, `ldm.training.run.train` saves a checkpoint of the last finite weights and raises
`NonFiniteGradients` naming it.

The decision needs the gradient norm on the host: one device synchronisation per optimizer step (`limit=None`
turns the check off). It is the same on every rank: DDP has averaged the gradients and FSDP's norm is the global
one, so a NaN on one rank is a NaN on all and no rank steps alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class NonFiniteGradients(RuntimeError):
    """The run stopped because too many consecutive optimizer steps had NaN/inf gradients."""


class NonFiniteGuard:
    """Counts the non-finite steps of one optimizer. `limit`: how many in a row are skipped before the run stops
    (0: stop at the first); None: no check."""

    def __init__(self, limit: int | None = 10) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0 or null, got {limit}")
        self.limit = limit
        self.total = 0  # over the whole run (restored from checkpoints)
        self.consecutive = 0
        self.first_step: int | None = None  # global step of the first skipped step of the current streak
        self.skipped_last = False

    def check(self, norm: Tensor | None, params: Iterable[nn.Parameter], step: int) -> bool:
        """True, and the gradients of `params` dropped, when `norm` (their total norm) is NaN or inf. `step`: the
        optimizer steps taken so far (Trainer.global_step), so this is step `step + 1`."""
        self.skipped_last = False
        if self.limit is None or norm is None:
            return False
        if bool(torch.isfinite(norm)):
            self.consecutive, self.first_step = 0, None
            return False
        for p in params:
            p.grad = None
        self.total += 1
        self.consecutive += 1
        if self.first_step is None:
            self.first_step = step
        self.skipped_last = True
        return True

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.consecutive > self.limit

    def message(self, step: int, what: str) -> str:
        return (
            f"{self.consecutive} optimizer steps in a row (steps {self.first_step + 1}–{step + 1}) had NaN/inf "
            f"gradients for {what} (max_nonfinite_steps={self.limit}; {self.total} skipped in this run). "
            f"They were skipped, so the weights are those after step {self.first_step}, finite. Usual causes: a "
            f"learning rate too high for this batch size (optim.lr, optim.warmup_steps), fp16 overflow (use "
            f"bf16-mixed), or a corrupt stretch of data. Resume with ckpt_path=<the checkpoint> after changing "
            f"one of them, or raise max_nonfinite_steps."
        )


def configured_limit(limit) -> int | None:
    """The config's `max_nonfinite_steps`, refused when negative (before anything is built)."""
    NonFiniteGuard(limit)
    return None if limit is None else int(limit)


# fp16's GradScaler starts at 2**16 and halves its scale at every overflowing step: 40 in a row take it below
# 2**-24, fp16's smallest subnormal, where no scale makes the gradients finite. Fewer are its search for a scale.
SCALER_STREAK = 40


def limit_under_scaler(limit: int | None, scaler) -> int | None:
    """The stop limit under an fp16 GradScaler (decided from the built Trainer: `16-mixed` on a CPU is bf16, and
    `16-true` has none): at least SCALER_STREAK. Skipped steps are still detected and counted, and leave the EMA."""
    if scaler is None or limit is None or limit >= SCALER_STREAK:
        return limit
    log.info("fp16 GradScaler: max_nonfinite_steps raised from %d to %d", limit, SCALER_STREAK)
    return SCALER_STREAK
