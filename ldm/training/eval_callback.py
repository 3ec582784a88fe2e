"""FID / KID / IS and CLIP score during training, on the EMA weights, logged against the step.

The same `eval.runner.Evaluator` as `eval/fid.py` (same protocol, same cached reference statistics), on a small
fixed set: `num_images` images of the captions (image i: caption i mod len, seed `seed + i`), so successive
evaluations differ only by the weights. With several GPUs every rank generates its share and torchmetrics
gathers. FID from a thousand images is biased upwards: compare runs and steps with each other, and report
final numbers from `eval/fid.py` with the protocol of the paper you compare with.

The `eval` package lives at the repository root (next to train.py) and is imported only when the callback is
enabled (`every_n_steps > 0`).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from ldm.training.fsdp import is_sharded
from ldm.training.resume import due_at_step, stopped_by_preemption


class EvalCallback(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 0,
        prompts: Sequence[str] = (),
        prompts_file: str | None = None,
        captions_from: str | None = None,
        reference: str | None = None,
        num_images: int = 1000,
        reference_num_images: int = 5000,
        sampler=None,
        guidance_scale: float = 3.0,
        guidance_interval: Sequence[float] | None = None,
        seed: int = 0,
        batch_size: int = 32,
        use_ema: bool = True,
        inception_weights: str | None = None,
        resize: str = "torch-fidelity",
        reference_cache_dir: str | None = None,
        fd_dinov2: bool = False,
        dinov2_weights: str | None = None,
        clip_model: str | None = "ViT-L-14-quickgelu",
        clip_pretrained: str | None = "openai",
        clip_cache_dir: str | None = None,
        at_train_end: bool = False,
    ) -> None:
        """every_n_steps: 0 turns the callback off (nothing is loaded). reference: real-image shards or an .npz of
        statistics; None → CLIP score only. clip_model: None → no CLIP score. Captions come from `prompts`,
        `prompts_file` or the first `num_images` captions of the `captions_from` shards."""
        self.every_n_steps, self.at_train_end = every_n_steps, at_train_end
        self.prompts, self.prompts_file, self.captions_from = list(prompts), prompts_file, captions_from
        self.reference, self.reference_num_images = reference, reference_num_images
        self.reference_cache_dir = reference_cache_dir
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.sampler, self.guidance_scale, self.use_ema = sampler, guidance_scale, use_ema
        self.guidance_interval = None if guidance_interval is None else [float(v) for v in guidance_interval]
        self.inception_weights, self.resize = inception_weights, resize
        self.fd_dinov2, self.dinov2_weights = fd_dinov2, dinov2_weights
        self.clip_model, self.clip_pretrained, self.clip_cache_dir = (
            clip_model,
            clip_pretrained,
            clip_cache_dir,
        )
        self.history: list[dict] = []  # {"step": …, metric: value}, on every rank
        self._evaluator = None
        self._captions = None
        self._last_step = -1

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            self._setup(trainer, pl_module)  # fail before training on missing weights or captions

    def _setup(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from eval.distributed import DistContext
        from eval.generate import load_captions
        from eval.runner import Evaluator

        if self.sampler is None:
            raise ValueError("EvalCallback needs a sampler (callbacks.eval.sampler: ${sampler})")
        prompts = self.prompts_file or self.prompts
        self._captions = load_captions(prompts, self.captions_from, self.num_images)
        resolution = ((getattr(pl_module, "config", None) or {}).get("data") or {}).get("resolution", 256)
        ctx = DistContext(trainer.global_rank, trainer.world_size, trainer.local_rank)
        rank_zero_info(f"EvalCallback: {self.num_images} images every {self.every_n_steps} steps")
        self._evaluator = Evaluator.build(
            device=pl_module.device,
            reference=self.reference,
            resolution=resolution,
            reference_num_images=self.reference_num_images,
            reference_cache_dir=self.reference_cache_dir,
            inception_weights=self.inception_weights,
            resize=self.resize,
            clip_model=self.clip_model,
            clip_pretrained=self.clip_pretrained,
            clip_cache_dir=self.clip_cache_dir,
            fd_dinov2=self.fd_dinov2,
            dinov2_weights=self.dinov2_weights,
            ctx=ctx,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if due_at_step(trainer, batch_idx, self.every_n_steps):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.enabled and self.at_train_end and not stopped_by_preemption(trainer):
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict | None:
        """Score the current (EMA) weights; every rank must call. Returns the metrics."""
        step = trainer.global_step
        if step == self._last_step:
            return self.history[-1] if self.history else None
        self._last_step = step
        if self._evaluator is None:
            self._setup(trainer, pl_module)

        def generate(prompts, seeds):
            return pl_module.generate(
                prompts,
                self.sampler,
                self.guidance_scale,
                seeds,
                use_ema=self.use_ema,
                guidance_interval=self.guidance_interval,
            )

        metrics, _ = self._evaluator.evaluate(
            generate,
            self._captions,
            self.num_images,
            self.seed,
            self.batch_size,
            collective=is_sharded(trainer.strategy),
        )
        logged = {f"eval/{k}": float(v) for k, v in metrics.items() if v is not None}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=step)
        self.history.append({"step": step, **logged})
        return logged
