"""Stage 1: train the KL autoencoder (reconstruction + KL, Rombach et al. 2022 §3 / appendix G)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.models import KLAutoencoder
from ldm.training.module_base import LDMModuleBase
from ldm.training.optim import AdamWSettings


class AutoencoderModule(LDMModuleBase):
    """loss = (Σ_pixels rec + kl_weight · Σ_latent KL) / num_pixel_values, averaged over the batch.

    The KL weight has the meaning it has in CompVis' configs (sums over pixels and latents, ~1e-6); dividing both
    terms by the number of pixel values only rescales the loss so learning rates and clipping transfer across sizes.
    """

    stage = "autoencoder"

    def __init__(
        self,
        autoencoder: KLAutoencoder,
        optim: AdamWSettings,
        kl_weight: float = 1e-6,
        reconstruction_loss: str = "l1",
        config: dict | None = None,
    ) -> None:
        super().__init__(optim=optim, config=config)
        if reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"reconstruction_loss must be 'l1' or 'l2', got {reconstruction_loss!r}")
        self.autoencoder, self.kl_weight, self.reconstruction_loss = (
            autoencoder,
            kl_weight,
            reconstruction_loss,
        )

    def trainable_module(self) -> torch.nn.Module:
        return self.autoencoder

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x = batch["image"]
        out = self.autoencoder(x)
        loss_fn = F.l1_loss if self.reconstruction_loss == "l1" else F.mse_loss
        rec = loss_fn(out.reconstruction, x, reduction="none").flatten(1).sum(1)  # (B,)
        kl = out.posterior.kl()  # (B,)
        pixels = x[0].numel()
        loss = (rec + self.kl_weight * kl).mean() / pixels
        mse = F.mse_loss(out.reconstruction.detach().clamp(-1, 1), x)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/rec_loss", rec.mean() / pixels)
        self.log("train/kl", kl.mean())
        self.log(
            "train/psnr", 10 * torch.log10(4.0 / mse.clamp_min(1e-10)), prog_bar=True
        )  # data range [-1, 1]
        self.log_data_stats(batch)
        return loss

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        return self.autoencoder(images, sample_posterior=False).reconstruction.clamp(-1, 1)

    def describe(self) -> dict:
        return {"downsample_factor": self.autoencoder.downsample_factor}
