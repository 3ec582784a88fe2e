"""Exact resume and preemption: what a checkpoint needs beyond weights and optimizer state, and the USR1 path.

- `ExactResumeCallback` tells the training loader which batches the training step consumed (Lightning fetches
  one ahead, so the loader alone cannot know) and saves every rank's random number generators, restoring them
  just before the first step after a resume. With the loader's own state (`ldm.data.stream`), a resumed run
  takes the same samples and the same noise as an uninterrupted one: on CPU, bit-identical weights.
- `PreemptionCallback` turns Slurm's warning signal (`#SBATCH --signal=USR1@90`, or `scancel --signal=USR1`)
  into a checkpoint at the next optimizer-step boundary, agreed by all ranks, and a clean stop; `run.train`
  then requeues the job (`scontrol requeue`) and the requeued job resumes from that checkpoint.
  Lightning's own handler (`SLURMEnvironment(auto_requeue=True)`) saves from inside the signal handler, on
  each rank at whatever point of the step it happens to be; this one waits for the step to end.
  Under Hydra's submitit launcher (`hydra/launcher=submitit_slurm`) it also catches submitit's signal (USR2),
  and the requeue is left to submitit's own handler, which resubmits the same sweep job.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from ldm.utils.launcher import gather_objects

log = logging.getLogger(__name__)


def _bytes(t: torch.Tensor) -> bytes:
    return t.cpu().numpy().tobytes()


def _tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def rng_state() -> dict:
    """This process's generators as plain data (ints, lists, bytes: no tensors, so it gathers across ranks
    with `all_gather_object` and loads with `weights_only=True`)."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()),
        "numpy": [np_state[0], np_state[1].tobytes(), *np_state[2:]],
        "torch": _bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.frombuffer(keys, dtype=np.uint32).copy(), *rest))
    torch.set_rng_state(_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])


def _train_loaders(trainer: L.Trainer) -> list:
    loader = trainer.fit_loop._combined_loader
    return [dl for dl in (loader.flattened if loader is not None else []) if hasattr(dl, "mark_consumed")]


class ExactResumeCallback(L.Callback):
    def __init__(self) -> None:
        self._loaded: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for loader in _train_loaders(trainer):
            loader.mark_consumed(batch)

    def state_dict(self) -> dict:
        return {"rng": {str(i): s for i, s in enumerate(gather_objects(rng_state()))}}

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        # after the loader's first `iter()` (which draws a worker seed), as in the run that saved the state
        if self._loaded is None:
            return
        states = self._loaded["rng"]
        mine = states.get(str(trainer.global_rank))
        if mine is not None and len(states) == trainer.world_size:
            set_rng_state(mine)
        else:
            log.warning(
                "random state saved by %d ranks, now %d: not restored", len(states), trainer.world_size
            )
        self._loaded = None


def preemption_signals() -> list[int]:
    """USR1, and in a job of Hydra's submitit launcher also the signal submitit has Slurm send before the time
    limit (`#SBATCH --signal=USR2@<signal_delay_s>`; `SUBMITIT_PREEMPT_SIGNAL` names another)."""
    signums = [signal.SIGUSR1]
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        submitit = getattr(signal, f"SIG{name}", None)
        if submitit is not None and submitit not in signums:
            signums.append(submitit)
    return signums


def ends_optimizer_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether this batch completes an optimizer step. Under gradient accumulation the other micro-batches carry
    the count of the step before (also the first ones after a resume from that step's checkpoint): what runs once
    per step (a checkpoint, a grid, an evaluation, the speed metrics) runs on this one."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


def due_at_step(trainer: L.Trainer, batch_idx: int, every_n_steps: int) -> bool:
    """Whether a task done every `every_n_steps` optimizer steps (0: never) is due on this batch."""
    step = trainer.global_step
    return (
        every_n_steps > 0
        and step > 0
        and step % every_n_steps == 0
        and ends_optimizer_step(trainer, batch_idx)
    )


def stopped_by_preemption(trainer: L.Trainer) -> bool:
    """Whether training stopped on the preemption signal: the run is not at its end (its requeued job goes on), and
    the time left before the kill is for the checkpoint and the requeue, not for end-of-training grids."""
    return any(isinstance(c, PreemptionCallback) and c.preempted for c in trainer.callbacks)


class PreemptionCallback(L.Callback):
    """On one of `signums` (default: `preemption_signals()`): at the next optimizer-step boundary every rank saves
    `hpc_ckpt_<n>.ckpt` in the run dir (where Lightning looks on a Slurm restart) and training stops;
    `preempted` and `checkpoint` say so, `received` names the signal.

    The handlers are installed at construction, so the signal is caught from then on (before that, during
    imports, it would end the process). The flag is all-reduced at each step end: a 1-element collective.
    `handed_over()` is the handler the received signal had before (submitit's, in a submitit job), which
    `run.train` calls after the checkpoint to requeue."""

    def __init__(self, signums: list[int] | None = None) -> None:
        self.signums = preemption_signals() if signums is None else list(signums)
        self.signalled = False
        self.received: int | None = None
        self.preempted = False
        self.checkpoint: str | None = None
        self._previous = {signum: signal.signal(signum, self._handler) for signum in self.signums}

    def _handler(self, signum, frame) -> None:
        self.signalled = True
        self.received = signum

    def handed_over(self):
        """For a signal other than USR1 (submitit's), the Python handler it had before this callback's; else None:
        `run.train` then requeues itself."""
        if self.received == signal.SIGUSR1:
            return None
        previous = self._previous.get(self.received)
        return previous if callable(previous) else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not ends_optimizer_step(trainer, batch_idx) or self.preempted:
            return  # mid-accumulation: the checkpoint would hold half a step
        flag = torch.tensor([int(self.signalled)], device=pl_module.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        self.preempted, self.checkpoint = True, str(Path(path))
        trainer.should_stop = True
        if trainer.is_global_zero:
            log.warning("preemption signal: saved %s at step %d; stopping", path, trainer.global_step)

    def teardown(self, trainer, pl_module, stage) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class SampleLogCallback(L.Callback):
    """Appends the keys of each consumed batch to `dir/rank<r>.jsonl` ({"step", "rank", "pid", "restart",
    "keys"}): which samples each step saw, to audit the data order of a run (and its resumes)."""

    def __init__(self, dir: str) -> None:
        self.dir = Path(dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        line = {
            "step": trainer.global_step,
            "rank": trainer.global_rank,
            "pid": os.getpid(),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "keys": list(batch.get("key", [])),
        }
        with open(self.dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
