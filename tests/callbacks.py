"""Callbacks that tests put into real runs (by `_target_: tests.callbacks....`, from the repository root)."""

from __future__ import annotations

import time

import lightning as L

from ldm.training.resume import PreemptionCallback


class HoldForPreemption(L.Callback):
    """After optimizer step `step`, hold the training loop until this process has received the preemption
    signal (at most `timeout` s), so that a test's USR1 lands at a known step however fast the steps run.
    It holds before `PreemptionCallback` looks at the signal (callbacks from the config come first)."""

    def __init__(self, step: int, timeout: float = 600.0) -> None:
        self.step, self.timeout = step, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCallback))
        deadline = time.monotonic() + self.timeout
        while not preemption.signalled and time.monotonic() < deadline:
            time.sleep(0.05)
