"""Callbacks that tests put into real runs (by `_target_: tests.callbacks....`, from the repository root)."""

from __future__ import annotations

import json
import time
from pathlib import Path

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


class PoisonBatches(L.Callback):
    """Fill the images of the batches of optimizer steps `steps` (counted as Trainer.global_step, before the step)
    with NaN, on the ranks `ranks` (all when None): a batch whose loss and gradients come out NaN."""

    def __init__(self, steps, ranks=None) -> None:
        self.steps, self.ranks = set(steps), None if ranks is None else set(ranks)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.steps and (self.ranks is None or trainer.global_rank in self.ranks):
            batch["image"].fill_(float("nan"))


class WeightLog(L.Callback):
    """Appends {"step", "rank", "sum", "ema_sum"} after every optimizer step to `dir/rank<r>.jsonl`: the trained network's
    weights (and the EMA copy's, when there is one) summed in float64, to compare ranks and steps."""

    def __init__(self, dir: str) -> None:
        self.dir = dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from ldm.training.fsdp import full_tensor  # the whole tensor of a parameter sharded by FSDP

        def total(module) -> float:
            return float(sum(full_tensor(p.detach()).double().sum() for p in module.parameters()))

        ema = getattr(pl_module, "ema", None)
        line = {
            "step": trainer.global_step,
            "rank": trainer.global_rank,
            "sum": total(pl_module.trainable_module()),
            "ema_sum": None if ema is None else total(ema.module),
        }
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        with open(Path(self.dir) / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
