"""Stage 2: train the cross-attention UNet on autoencoder latents, conditioned on a frozen text encoder.

The module orchestrates; the math lives in `ldm.diffusion`, the networks in `ldm.models`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ldm.conditioning import FrozenOpenCLIPTextEncoder
from ldm.diffusion import GaussianDiffusion, drop_conditioning
from ldm.inference import LatentCodec, TextToImage, unet_denoiser
from ldm.models import CrossAttentionUNet
from ldm.training.ema import EMA
from ldm.training.module_base import LDMModuleBase
from ldm.training.optim import AdamWSettings


class DiffusionModule(LDMModuleBase):
    stage = "diffusion"

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
        config: dict | None = None,
    ) -> None:
        super().__init__(optim=optim, config=config)
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self.unet, self.diffusion, self.text_encoder, self.codec = unet, diffusion, text_encoder, codec
        self.text_encoder.requires_grad_(False)
        self.cond_drop_prob, self.sample_posterior = cond_drop_prob, sample_posterior
        self.ema = EMA(unet, decay=ema_decay, warmup=ema_warmup)
        self.denoise = unet_denoiser(self.unet)

    def trainable_module(self) -> torch.nn.Module:
        return self.unet

    # --- training -------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if not self.codec.is_calibrated:
            self._calibrate_latent_scale(batch["image"])

    @torch.no_grad()
    def _calibrate_latent_scale(self, images: Tensor) -> None:
        """scale = 1 / std of the latents of the first batch (all ranks pooled), as Rombach et al. do.

        Runs only when neither config nor the autoencoder checkpoint provides a measured scale; the value is a
        buffer, so it is saved in every checkpoint and restored on resume.
        """
        z = self.codec.autoencoder.encode(images).sample().float()
        stats = torch.stack([z.sum(), (z * z).sum(), torch.tensor(float(z.numel()), device=z.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        total, total_sq, n = stats
        std = (total_sq / n - (total / n) ** 2).clamp_min(1e-12).sqrt()
        self.codec.scale.fill_(float(1.0 / std))
        self.print(f"latent scale measured on the first batch: 1/std = {float(self.codec.scale):.5f}")

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, captions = batch["image"], batch["caption"]
        z0 = self.codec.encode(images, sample=self.sample_posterior)  # (B, C, h, w), unit variance
        cond = self.text_encoder(captions)
        drop = drop_conditioning(len(captions), self.cond_drop_prob, device=z0.device)
        cond = cond.where(drop, self.text_encoder.null())
        out = self.diffusion.loss(lambda x, t: self.denoise(x, t, cond), z0)
        self.log("train/loss", out.loss, prog_bar=True)
        self.log_per_timestep_loss(out.per_sample, out.t, self.diffusion.num_timesteps)
        self.log_data_stats(batch)
        return out.loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.update(self.unet)

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
    ) -> Tensor:
        was_training = self.unet.training
        self.unet.eval()
        try:
            return self.pipeline(use_ema)(prompts, sampler, guidance_scale=guidance_scale, seeds=seeds)
        finally:
            self.unet.train(was_training)

    # --- checkpoint -------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "latent_scale": float(self.codec.scale),
            "latent_shift": float(self.codec.shift),
            "text_encoder": self.text_encoder.identity(),
            "diffusion": {
                "num_timesteps": self.diffusion.num_timesteps,
                "prediction": self.diffusion.prediction,
            },
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if not self.text_encoder.identity()["weights_in_checkpoint"]:
            # pretrained encoders are re-loaded from their tag/file; don't copy ~1 GB into every checkpoint
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("text_encoder.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        if not any(k.startswith("text_encoder.") for k in state):
            state.update({f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()})
