"""Stage 1: train the KL autoencoder the way latent diffusion's autoencoders were trained (Esser et al. 2021,
Rombach et al. 2022 appendix G): L1 + LPIPS + KL, and a PatchGAN discriminator from `disc_start` on.

Two optimizers (autoencoder, discriminator) under Lightning's manual optimization. The loss itself
(`AutoencoderLoss`) is pure torch; this module orchestrates it, validates (PSNR, SSIM, LPIPS on held-out shards)
and, at the end of training, measures the latent statistics stage 2 needs.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.latent_stats import image_batches, latent_description, measure_latent_stats
from ldm.models import KLAutoencoder
from ldm.training.autoencoder_loss import AutoencoderLoss
from ldm.training.module_base import LDMModuleBase
from ldm.training.optim import AdamWSettings
from ldm.training.resume import rng_state, set_rng_state
from ldm.utils.checkpoint import BUNDLE_KEY

log = logging.getLogger(__name__)


class AutoencoderModule(LDMModuleBase):
    """`loss` holds the discriminator (trained here too) and the frozen LPIPS. `gradient_clip_val` applies to the
    autoencoder and the discriminator separately (manual optimization: the Trainer's own clipping is off)."""

    stage = "autoencoder"
    weights_only_prefixes = ("autoencoder.",)

    def __init__(
        self,
        autoencoder: KLAutoencoder,
        optim: AdamWSettings,
        loss: AutoencoderLoss | None = None,
        latent_stats_samples: int = 4096,
        config: dict | None = None,
    ) -> None:
        super().__init__(optim=optim, config=config)
        self.automatic_optimization = False
        self.autoencoder = autoencoder
        self.loss = loss if loss is not None else AutoencoderLoss(discriminator=None, lpips=None)
        self.latent_stats_samples = latent_stats_samples
        self.gradient_clip_val: float | None = None  # set by run.train from trainer.gradient_clip_val
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))  # mean of per-image PSNRs
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.latent_description: dict = {}

    def trainable_module(self) -> torch.nn.Module:
        return self.autoencoder

    def configure_optimizers(self):
        max_steps = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        opt_ae, sched_ae = self.optim_settings.build(self.autoencoder, max_steps)
        if self.loss.discriminator is None:
            return [opt_ae], [sched_ae]
        # the discriminator's schedule starts (warm-up included) when it does, and ends with the autoencoder's
        d_steps = None if max_steps is None else max(1, max_steps - self.loss.disc_start)
        opt_d, sched_d = self.optim_settings.build(self.loss.discriminator, d_steps)
        return [opt_ae, opt_d], [sched_ae, sched_d]

    # --- training -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x, step = batch["image"], self.global_step
        optimizers, schedulers = _as_list(self.optimizers()), _as_list(self.lr_schedulers())
        # a skipped step leaves the discriminator's BatchNorm statistics too: a NaN batch would make them NaN for good
        disc_stats = _buffers(self.loss.discriminator)
        out = self.autoencoder(x)

        g = self.loss.generator_loss(x, out.reconstruction, out.posterior, step, self.autoencoder.last_layer)
        optimizers[0].zero_grad(set_to_none=True)
        self.manual_backward(g.loss)
        skipped = self._clip_and_step(optimizers[0], self.autoencoder, "train/grad_norm")

        if self.loss.discriminator_active(step):
            # the fakes are this batch's reconstructions from before the autoencoder's step (detached), as in most
            # GAN training; CompVis re-encodes the batch for D (a second forward) and sgm alternates the two
            d = self.loss.discriminator_loss(x, out.reconstruction, step)
            opt_d = optimizers[1]
            opt_d.zero_grad(set_to_none=True)  # also drops what the generator loss left on D
            self.manual_backward(d.loss)
            # the discriminator's step is not a training step: global_step and max_steps count batches
            # (Lightning counts every optimizer.step() in manual optimization, #17958)
            opt_d._on_before_step = opt_d._on_after_step = _nothing
            skipped |= self._clip_and_step(opt_d, self.loss.discriminator, "train/disc_grad_norm")
            self.log_dict(
                {
                    "train/disc_loss": d.loss,
                    "train/logits_real": d.logits_real,
                    "train/logits_fake": d.logits_fake,
                }
            )
            schedulers[1].step()
        schedulers[0].step()
        if skipped:
            for name, value in disc_stats.items():
                self.loss.discriminator.get_buffer(name).copy_(value)

        mse = torch.nn.functional.mse_loss(out.reconstruction.detach().clamp(-1, 1), x)
        self.log("train/loss", g.loss.detach(), prog_bar=True)
        self.log_dict({"train/rec_loss": g.rec, "train/kl": g.kl, "train/nll": g.nll})
        self.log("train/psnr", 10 * torch.log10(4.0 / mse.clamp_min(1e-10)), prog_bar=True)  # range [-1, 1]
        if self.loss.lpips is not None and self.loss.perceptual_weight > 0:
            self.log("train/lpips", g.perceptual)
        if self.loss.discriminator_active(step):
            self.log_dict({"train/g_loss": g.g_loss, "train/d_weight": g.d_weight})
        self.log_data_stats(batch)
        return g.loss.detach()

    def _clip_and_step(self, optimizer, module: torch.nn.Module, name: str) -> bool:
        """Check, clip and step `module`'s gradients; True when the step was skipped (NaN/inf)."""
        # under fp16 the gradients are still scaled here (manual optimization: Lightning unscales them inside
        # optimizer.step()), so the norm is divided by the scale and the clip threshold multiplied by it
        scale = self.grad_scaler.get_scale() if self.grad_scaler is not None else 1.0
        skipped = self.check_gradients(module, name, scale)  # NaN/inf: the step below changes nothing
        if self.gradient_clip_val:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.gradient_clip_val * scale, gradient_clip_algorithm="norm"
            )
        optimizer.step()
        return skipped

    # --- validation -----------------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        recon = self.reconstruct(x)
        target, pred = (x + 1) / 2, (recon + 1) / 2
        self.val_psnr.update(pred, target)
        self.val_ssim.update(pred, target)
        n = len(x)
        self.log("val/l1", (recon - x).abs().mean(), batch_size=n, sync_dist=True)
        if self.loss.lpips is not None:
            self.log("val/lpips", self.loss.lpips(x, recon).mean(), batch_size=n, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.log("val/psnr", self.val_psnr.compute(), prog_bar=True)
        self.log("val/ssim", self.val_ssim.compute())
        self.val_psnr.reset()
        self.val_ssim.reset()

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        return self.autoencoder(images, sample_posterior=False).reconstruction.clamp(-1, 1)

    # --- latent statistics and checkpoint -------------------------------------------------------------------
    def on_train_end(self) -> None:
        """Measure the latent scale on held-out shards (else training shards) so stage 2 can read it."""
        data = getattr(self.trainer, "datamodule", None)
        if self.latent_stats_samples <= 0 or data is None or not self.trainer.is_global_zero:
            return
        urls = data.val_urls or data.train_urls
        # the final checkpoint is saved after this hook, with the random generators' state: a measurement that
        # drew from them (the DataLoader's worker seeds) would make a resume from it differ from a longer run
        rng = rng_state()
        batches = image_batches(urls, data.resolution, data.batch_size, device=self.device, seed=0)
        generator = torch.Generator(self.device).manual_seed(0)
        training = self.autoencoder.training
        self.autoencoder.eval()  # as stage 2 and scripts/latent_stats.py encode: no dropout
        try:
            stats = measure_latent_stats(
                self.autoencoder.encode, batches, self.latent_stats_samples, generator=generator
            )
        finally:
            set_rng_state(rng)
            self.autoencoder.train(training)
        self.latent_description = latent_description(stats)
        log.info(
            f"latent statistics over {stats.num_samples} images: std {stats.std:.4f} → latent scale "
            f"{stats.scale:.4f}, mean {stats.mean:+.4f} (stored in the checkpoint)"
        )

    def describe(self) -> dict:
        return {"downsample_factor": self.autoencoder.downsample_factor, **self.latent_description}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("loss.lpips.")]:
            del state[key]  # frozen, rebuilt from its weights file: no need for ~60 MB in every checkpoint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.loss.lpips is not None:
            checkpoint["state_dict"].update(
                {f"loss.lpips.{k}": v for k, v in self.loss.lpips.state_dict().items()}
            )
        self.latent_description = {
            k: v
            for k, v in checkpoint.get(BUNDLE_KEY, {}).items()
            if k in ("latent_scale", "latent_shift", "latent_stats")
        }


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, list | tuple) else [x]


def _nothing() -> None:
    return None


def _buffers(module: torch.nn.Module | None) -> dict[str, Tensor]:
    return {} if module is None else {name: b.detach().clone() for name, b in module.named_buffers()}
