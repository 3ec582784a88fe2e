"""Stage 2: train the cross-attention UNet on autoencoder latents, conditioned on a frozen text encoder.

The module orchestrates; the math lives in `ldm.diffusion`, the networks in `ldm.models`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ldm.conditioning import Conditioning, FrozenOpenCLIPTextEncoder
from ldm.data.masks import InpaintMasks, inpainting_input
from ldm.diffusion import GaussianDiffusion, drop_conditioning
from ldm.inference import LatentCodec, TextToImage, is_inpainting_unet, unet_denoiser
from ldm.latent_stats import LatentMoments
from ldm.models import CrossAttentionUNet
from ldm.models.unet import default_micro_conditioning, micro_conditioning
from ldm.training.ema import EMA, PowerEMA
from ldm.training.module_base import LDMModuleBase
from ldm.training.optim import AdamWSettings
from ldm.training.posthoc_ema import sigma_rel_to_gamma

log = logging.getLogger(__name__)


class DiffusionModule(LDMModuleBase):
    stage = "diffusion"
    weights_only_prefixes = ("ema.", "codec.", "text_encoder.")  # EMA UNet, autoencoder + latent scale

    def __init__(
        self,
        unet: CrossAttentionUNet,
        diffusion: GaussianDiffusion,
        text_encoder: FrozenOpenCLIPTextEncoder,
        codec: LatentCodec,
        optim: AdamWSettings,
        cond_drop_prob: float = 0.1,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        sample_posterior: bool = True,
        inpainting_masks: InpaintMasks | None = None,
        val_timesteps: int = 10,
        val_seed: int = 0,
        val_use_ema: bool = True,
        posthoc_ema: Sequence[float] | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__(optim=optim, config=config)
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self.unet, self.diffusion, self.text_encoder, self.codec = unet, diffusion, text_encoder, codec
        self.text_encoder.requires_grad_(False)
        self.cond_drop_prob, self.sample_posterior = cond_drop_prob, sample_posterior
        self.inpainting_masks = inpainting_masks
        if (inpainting_masks is not None) != is_inpainting_unet(unet):
            raise ValueError(
                f"inpainting_masks={inpainting_masks!r} but the UNet has {unet.in_channels} input channels for "
                f"{unet.out_channels} output channels (an inpainting UNet takes 2 C + 1: x_t, mask, masked latents)"
            )
        self.ema = EMA(unet, decay=ema_decay, warmup=ema_warmup)
        # post-hoc EMA: power-function averages of these relative widths, snapshotted by PostHocEMASnapshots
        self.posthoc_ema = (
            PowerEMA(unet, [sigma_rel_to_gamma(s) for s in posthoc_ema]) if posthoc_ema else None
        )
        self._captions_checked = self._captions_truncated = 0
        self.denoise = unet_denoiser(self.unet)
        if val_timesteps < 0 or val_timesteps > diffusion.num_timesteps:
            raise ValueError(f"val_timesteps must be in [0, {diffusion.num_timesteps}], got {val_timesteps}")
        self.val_timesteps, self.val_seed, self.val_use_ema = val_timesteps, val_seed, val_use_ema
        # one running mean per timestep and one of the objective: exact over batches and ranks (not persistent)
        self.val_loss = MeanMetric()
        self.val_loss_by_t = nn.ModuleList(MeanMetric() for _ in range(val_timesteps))

    def trainable_module(self) -> torch.nn.Module:
        return self.unet

    def sharded_networks(self) -> list[torch.nn.Module]:
        """What `strategy=fsdp` shards: the UNet and its EMA copies (sharded alike, so the EMA updates stay local
        to each rank's shard). The frozen text encoder and autoencoder stay whole on every rank."""
        averages = list(self.posthoc_ema.averages) if self.posthoc_ema is not None else []
        return [self.unet, self.ema.module, *averages]

    # --- training -------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if not self.codec.is_calibrated:
            self._calibrate_latent_scale(self._raw_latents(batch))

    @torch.no_grad()
    def _calibrate_latent_scale(self, z: Tensor) -> None:
        """scale = 1 / std of the first batch's latents (all ranks pooled), as Rombach et al. do.

        Runs only when neither config nor the autoencoder checkpoint provides a measured scale (stage 1 measures
        it on more data; see scripts/latent_stats.py); the value is a buffer, so checkpoints keep it.
        """
        moments = LatentMoments(z.shape[1])
        moments.update(z)
        self.codec.scale.fill_(moments.stats().scale)
        self.print(f"latent scale measured on the first batch: 1/std = {float(self.codec.scale):.5f}")

    @torch.no_grad()
    def _raw_latents(self, batch: dict) -> Tensor:
        """Unscaled latents (B, C, h, w): drawn from the cached posterior, or encoded from the images now."""
        if "latent_mean" in batch:
            mean = batch["latent_mean"]
            return mean + batch["latent_std"] * torch.randn_like(mean) if self.sample_posterior else mean
        posterior = self.codec.autoencoder.encode(batch["image"])
        return posterior.sample() if self.sample_posterior else posterior.mode()

    def _conditioning(self, batch: dict) -> Conditioning:
        if "text_tokens" in batch:  # cached with the latents
            return Conditioning(batch["text_tokens"], batch.get("text_pooled"), batch.get("text_mask"))
        if self.training:  # the share of the training data; held-out captions are not counted
            self._count_truncated(batch["caption"])
        return self.text_encoder(batch["caption"])

    TRUNCATION_SAMPLE = 16  # captions per batch checked for truncation (tokenizing them again costs CPU time)

    def _count_truncated(self, captions: list[str]) -> None:
        """`data/captions_truncated_frac`: the share of training captions longer than the text encoder's context
        (77 tokens for OpenCLIP), whose ends it never sees — common with long synthetic captions. Estimated on
        the first `TRUNCATION_SAMPLE` captions of each batch, cumulated over the run (on this process)."""
        truncated = getattr(self.text_encoder, "truncated", None)
        if truncated is None or not captions:
            return
        checked = list(captions[: self.TRUNCATION_SAMPLE])
        self._captions_checked += len(checked)
        self._captions_truncated += int(truncated(checked).sum())
        self.log("data/captions_truncated_frac", self._captions_truncated / self._captions_checked)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        z0 = self.codec.normalize(self._raw_latents(batch))  # (B, C, h, w), unit variance
        cond = self._conditioning(batch)
        drop = drop_conditioning(len(cond), self.cond_drop_prob, device=z0.device)
        cond = cond.where(drop, self.text_encoder.null())
        micro = self._micro_conditioning(batch, z0)
        denoise = self.denoise if micro is None else unet_denoiser(self.unet, micro=micro)
        if (
            self.inpainting_masks is not None
        ):  # the text is dropped as above; the mask and kept latents never are
            mask = self.inpainting_masks(len(z0), *z0.shape[-2:], device=z0.device)
            denoise = unet_denoiser(self.unet, inpainting_input(z0, mask.to(z0.dtype)), micro)
        out = self.diffusion.loss(lambda x, t: denoise(x, t, cond), z0)
        self.log("train/loss", out.loss, prog_bar=True)
        self.log_per_timestep_loss(out.per_sample, out.t, self.diffusion.num_timesteps)
        self.log_data_stats(batch)
        return out.loss

    def _micro_conditioning(self, batch: dict, z0: Tensor) -> Tensor | None:
        """SDXL size/crop conditioning for a UNet built with it: the batch's (aspect-ratio buckets carry it),
        else that of an uncropped image of the training size."""
        if not self.unet.micro_conditioning:
            return None
        if "original_size" in batch:
            return micro_conditioning(batch["original_size"], batch["crop_coords"], batch["target_size"])
        f = self.codec.autoencoder.downsample_factor
        return default_micro_conditioning(len(z0), z0.shape[-2] * f, z0.shape[-1] * f, z0.device)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: callbacks' on_train_batch_end (checkpoints, preemption) run before the
        # module's, and must see the EMA of the step they save; with accumulation, once per optimizer step
        if not self.skipped_last_step:  # a step skipped for NaN/inf gradients left the weights as they were
            self.ema.update(self.unet)
            if self.posthoc_ema is not None:
                self.posthoc_ema.update(self.unet)

    # --- validation: a held-out loss that moves only when the weights do ---------------------------------------
    def validation_timesteps(self) -> list[int]:
        """The centres of `val_timesteps` equal bins of [0, T): with 10 bins, those of `train_loss_by_t`."""
        num, k = self.diffusion.num_timesteps, self.val_timesteps
        return [(2 * i + 1) * num // (2 * k) for i in range(k)]

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Each held-out image (posterior mean, its own caption, never dropped) is noised at every one of
        `validation_timesteps()` with noise drawn from a generator seeded by its key and `val_seed`, and scored
        with the training objective (EMA weights unless `val_use_ema=false`). Image, noise and timesteps are
        then the same at every validation, whatever the batching or the number of ranks, so the curve is not
        the noisy training loss again: it falls when the model improves (SD3, Esser et al. 2024, sec. 5.3.3, found
        such a validation loss to track image quality)."""
        if not self.val_timesteps:
            return
        raw = (
            batch["latent_mean"]
            if "latent_mean" in batch
            else self.codec.autoencoder.encode(batch["image"]).mode()
        )
        if not self.codec.is_calibrated:
            self._calibrate_latent_scale(raw)
        z0 = self.codec.normalize(raw)
        cond = self._conditioning(batch)
        generators = [
            torch.Generator().manual_seed(validation_seed(key, self.val_seed)) for key in batch["key"]
        ]
        shape = (1, *z0.shape[1:])
        noise = torch.cat([self.diffusion.training_noise(shape, "cpu", torch.float32, g) for g in generators])
        noise = noise.to(z0)
        net = self.ema.module if self.val_use_ema else self.unet
        concat = None
        if self.inpainting_masks is not None:
            h, w = z0.shape[-2:]
            mask = torch.cat([self.inpainting_masks(1, h, w, generator=g) for g in generators]).to(z0)
            concat = inpainting_input(z0, mask)
        denoise = unet_denoiser(net, concat, self._micro_conditioning(batch, z0))
        for i, t in enumerate(self.validation_timesteps()):
            timesteps = torch.full((len(z0),), t, device=z0.device, dtype=torch.long)
            out = self.diffusion.loss(lambda x, tt: denoise(x, tt, cond), z0, t=timesteps, noise=noise)
            self.val_loss_by_t[i].update(out.per_sample)
            self.val_loss.update(out.weights * out.per_sample)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True)
        width = self.diffusion.num_timesteps // self.val_timesteps
        for i, metric in enumerate(self.val_loss_by_t):
            self.log(
                f"val_loss_by_t/{i * width:04d}-{(i + 1) * width - 1:04d}",
                metric,
                on_step=False,
                on_epoch=True,
            )

    # --- sampling ---------------------------------------------------------------------------------------------
    def pipeline(self, use_ema: bool = True) -> TextToImage:
        unet = self.ema.module if use_ema else self.unet
        resolution = (self.config or {}).get("data", {}).get("resolution", 256)
        return TextToImage(unet, self.codec, self.text_encoder, self.diffusion, resolution)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        sampler,
        guidance_scale: float,
        seeds: Sequence[int],
        use_ema: bool = True,
        guidance_interval: Sequence[float] | None = None,
    ) -> Tensor:
        was_training = self.unet.training
        self.unet.eval()
        try:
            return self.pipeline(use_ema)(
                prompts,
                sampler,
                guidance_scale=guidance_scale,
                seeds=seeds,
                guidance_interval=guidance_interval,
            )
        finally:
            self.unet.train(was_training)

    # --- checkpoint -------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "latent_scale": float(self.codec.scale),
            "latent_shift": float(self.codec.shift),
            "text_encoder": self.text_encoder.identity(),
            "diffusion": self.diffusion.describe(),  # schedule, prediction and the training options
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if not self.text_encoder.identity()["weights_in_checkpoint"]:
            # pretrained encoders are re-loaded from their tag/file; don't copy ~1 GB into every checkpoint
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("text_encoder.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.complete_state_dict(checkpoint["state_dict"])

    def complete_state_dict(self, state: dict) -> None:
        """A checkpoint without the pretrained text encoder's weights gets this module's (loaded from its tag).
        Post-hoc EMA switched on or off between a run and its resume: its averages start now, or are dropped."""
        if not any(k.startswith("text_encoder.") for k in state):
            state.update({f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()})
        saved = [k for k in state if k.startswith("posthoc_ema.")]
        if self.posthoc_ema is None and saved:
            log.warning("the checkpoint has post-hoc EMA averages, but stage.posthoc_ema is off: dropped")
            for key in saved:
                del state[key]
        elif self.posthoc_ema is not None and not saved:
            log.warning(
                "stage.posthoc_ema is on, but the checkpoint has no averages: they start at this step"
            )
            state.update({f"posthoc_ema.{k}": v for k, v in self.posthoc_ema.state_dict().items()})


def validation_seed(key: str, seed: int = 0) -> int:
    """The seed of a held-out sample's noise (and inpainting mask): a hash of its key and `seed`, so it does not
    depend on batching, order or rank."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
