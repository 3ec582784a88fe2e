"""Callbacks: sample grids of fixed prompts (stage 2) and reconstruction grids (stage 1), saved and logged."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch import callbacks
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from ldm.sampling import late_start_warning
from ldm.training.fsdp import is_sharded
from ldm.training.resume import due_at_step, rng_state, set_rng_state, stopped_by_preemption
from ldm.utils.images import labelled_grid, save_png


def _log_image(trainer: L.Trainer, key: str, image, caption: str) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], caption=[caption], step=trainer.global_step)


def _out_dir(trainer: L.Trainer, name: str) -> Path:
    return Path(trainer.default_root_dir) / name


@contextmanager
def _inference(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) without autograd, then every submodule's mode and the random generators as they were:
    a grid (rank 0's alone) leaves training, and a resume from a checkpoint saved after it, as without it."""
    modes, rng = [(m, m.training) for m in module.modules()], rng_state()
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
        set_rng_state(rng)


class LearningRateMonitor(callbacks.LearningRateMonitor):
    """Lightning's, which refuses to start a run without a logger (`~logger`): such a run trains, its LR unlogged."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class SampleGridCallback(L.Callback):
    """Every `every_n_steps` (and at the end of training) sample `prompts` with the EMA weights."""

    def __init__(
        self,
        prompts: Sequence[str],
        sampler,
        every_n_steps: int = 1000,
        num_per_prompt: int = 4,
        guidance_scale: float = 5.0,
        seed: int = 0,
        use_ema: bool = True,
        at_train_end: bool = True,
        guidance_interval: Sequence[float] | None = None,
    ) -> None:
        self.prompts, self.sampler = list(prompts), sampler
        self.guidance_interval = None if guidance_interval is None else [float(v) for v in guidance_interval]
        self.every_n_steps, self.num_per_prompt = every_n_steps, num_per_prompt
        self.guidance_scale, self.seed, self.use_ema, self.at_train_end = (
            guidance_scale,
            seed,
            use_ema,
            at_train_end,
        )
        self.last_grid: Path | None = None
        self._last_step = -1

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.prompts and (warning := late_start_warning(pl_module.diffusion, self.sampler)):
            rank_zero_warn(f"sample grids: {warning}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if due_at_step(trainer, batch_idx, self.every_n_steps):
            self.make_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end and not stopped_by_preemption(trainer):
            self.make_grid(trainer, pl_module)

    def caption(self, step: int) -> str:
        """The W&B caption of a grid: when and how it was sampled, and its rows' prompts."""
        sampler, steps = type(self.sampler).__name__, getattr(self.sampler, "num_steps", None)
        how = f"{sampler}, {steps} steps" if steps else sampler
        weights = "EMA" if self.use_ema else "raw"
        band = (
            ""
            if self.guidance_interval is None
            else f" in sigma ({self.guidance_interval[0]:g}, {self.guidance_interval[1]:g}]"
        )
        return f"step {step}, {how}, guidance {self.guidance_scale}{band}, {weights} weights: " + " | ".join(
            self.prompts
        )

    def make_grid(self, trainer, pl_module) -> Path | None:
        """Rank 0 samples, saves and logs the grid. Under `strategy=fsdp` every rank samples it too: a sharded
        UNet's forward is a collective (each block gathers its weights from all ranks)."""
        step = trainer.global_step
        samples_here = trainer.is_global_zero or is_sharded(trainer.strategy)
        if step == self._last_step or not self.prompts or not samples_here:
            return self.last_grid
        self._last_step = step
        prompts = [p for p in self.prompts for _ in range(self.num_per_prompt)]
        seeds = [self.seed + i for i in range(self.num_per_prompt)] * len(self.prompts)
        images = pl_module.generate(
            prompts,
            self.sampler,
            self.guidance_scale,
            seeds,
            use_ema=self.use_ema,
            guidance_interval=self.guidance_interval,
        )
        if not trainer.is_global_zero:
            return None
        grid = labelled_grid(images.cpu(), self.num_per_prompt, self.prompts)
        meta = {
            "step": step,
            "guidance_scale": self.guidance_scale,
            "guidance_interval": self.guidance_interval,
            "prompts": self.prompts,
            "seed": self.seed,
        }
        self.last_grid = save_png(grid, _out_dir(trainer, "samples") / f"step_{step:07d}.png", meta)
        _log_image(trainer, "samples/grid", grid, self.caption(step))
        return self.last_grid


class ReconstructionGridCallback(L.Callback):
    """Every `every_n_steps`: input | reconstruction pairs, of the first held-out batch when there is validation
    data (the same images every time, so grids compare across steps), else of the current training batch."""

    def __init__(self, every_n_steps: int = 1000, num_images: int = 8, at_train_end: bool = True) -> None:
        self.every_n_steps, self.num_images, self.at_train_end = every_n_steps, num_images, at_train_end
        self._batch = None
        self._held_out = None
        self._last_step = -1

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx == 0 and self._held_out is None:
            self._held_out = batch["image"][: self.num_images].detach()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batch = batch["image"][: self.num_images].detach()
        if due_at_step(trainer, batch_idx, self.every_n_steps):
            self.make_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        done = trainer.global_step == self._last_step  # the last step's grid is made
        if self.at_train_end and self._batch is not None and not done and not stopped_by_preemption(trainer):
            self.make_grid(trainer, pl_module)

    @rank_zero_only
    def make_grid(self, trainer, pl_module) -> Path:
        self._last_step = trainer.global_step
        x = (self._held_out if self._held_out is not None else self._batch).to(pl_module.device)
        with _inference(pl_module):
            recon = pl_module.reconstruct(x)
        pairs = torch.stack([x, recon], dim=1).flatten(0, 1)  # (2N, C, H, W): input, output, input, output …
        grid = labelled_grid((pairs.cpu() + 1) / 2, ncols=2 * min(4, len(x)))
        path = save_png(grid, _out_dir(trainer, "reconstructions") / f"step_{trainer.global_step:07d}.png")
        source = "held-out" if self._held_out is not None else "training"
        _log_image(trainer, "reconstructions/grid", grid, f"input | reconstruction ({source} images)")
        return path
