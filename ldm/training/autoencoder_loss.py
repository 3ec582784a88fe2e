"""Stage-1 loss of Stable Diffusion's autoencoder: L1 + LPIPS + KL + adaptive-weight PatchGAN.

Follows CompVis `ldm/modules/losses/contperceptual.py::LPIPSWithDiscriminator` (itself taming-transformers'
VQGAN loss, Esser et al. 2021 eq. 7) with the log-variance fixed at 0, then divides the generator loss by the
number of pixel values per sample (C·H·W), as `AutoencoderModule` does, so learning rates and gradient clipping
transfer across image sizes. Pure torch: the Lightning module owns the two optimizers and calls the two methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.autoencoder import DiagonalGaussian
from ldm.models.discriminator import PatchDiscriminator
from ldm.models.lpips import LPIPS


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))]) (Lim & Ye 2017; taming `hinge_d_loss`)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """½ (E[softplus(−D(x))] + E[softplus(D(x̂))]): the non-saturating GAN loss on logits (Goodfellow et al. 2014)."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISC_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """λ = ‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), clamped to [0, max_weight], detached (Esser et al. 2021 eq. 7).

    L is the decoder's last layer (CompVis `calculate_adaptive_weight`, without its `discriminator_weight` factor).
    The graph is retained, so the caller can still backpropagate a loss built from `nll_loss` and `g_loss`.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0.0, max_weight).detach()


@dataclass
class GeneratorLoss:
    """The autoencoder's loss and its parts; only `loss` carries a graph.

    loss = nll + (kl_weight · kl + d_weight · disc_factor · g_loss) / (C·H·W), where
    nll = rec + perceptual_weight · perceptual is CompVis' `nll_loss` / (C·H·W), rec the mean |x − x̂| (or squared
    error) per pixel value, perceptual the mean LPIPS distance (0 when skipped), kl CompVis' `kl_loss` (per-sample KL
    summed over the latent, batch mean), g_loss = −mean D(x̂) and d_weight CompVis' `d_weight` (adaptive weight ·
    disc_weight); g_loss and d_weight are 0 before disc_start or without a discriminator.
    """

    loss: Tensor
    rec: Tensor
    perceptual: Tensor
    kl: Tensor
    g_loss: Tensor
    d_weight: Tensor
    nll: Tensor


@dataclass
class DiscriminatorLoss:
    """loss = disc_factor · (hinge or vanilla) loss; logits_* are batch means of D's logits, for logging.

    Before disc_start everything is 0 and `loss` has no graph (D was not run): skip its backward and step.
    """

    loss: Tensor
    logits_real: Tensor
    logits_fake: Tensor


class AutoencoderLoss(nn.Module):
    """Holds the frozen LPIPS, the trainable discriminator and the loss weights (SD VAE values as defaults).

    Generator side: `generator_loss(...)` → backward → autoencoder optimizer. Discriminator side:
    `discriminator_loss(...)` (inputs detached) → backward → discriminator optimizer. The GAN terms switch on at
    `global_step >= disc_start` (CompVis `adopt_weight`); before, D is neither run nor given gradients.
    """

    def __init__(
        self,
        discriminator: PatchDiscriminator | None,
        lpips: LPIPS | None,
        reconstruction: str = "l1",
        perceptual_weight: float = 1.0,
        kl_weight: float = 1e-6,
        disc_weight: float = 0.5,
        disc_start: int = 50001,
        disc_loss: str = "hinge",
        disc_factor: float = 1.0,
        adaptive_max_weight: float = 1e4,
    ) -> None:
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {tuple(DISC_LOSSES)}, got {disc_loss!r}")
        self.discriminator, self.lpips = discriminator, lpips
        self.reconstruction, self.disc_loss = reconstruction, disc_loss
        self.perceptual_weight, self.kl_weight = perceptual_weight, kl_weight
        self.disc_weight, self.disc_start, self.disc_factor = disc_weight, disc_start, disc_factor
        self.adaptive_max_weight = adaptive_max_weight

    def discriminator_active(self, global_step: int) -> bool:
        return self.discriminator is not None and self.disc_factor > 0 and global_step >= self.disc_start

    def generator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        posterior: DiagonalGaussian,
        global_step: int,
        last_layer: Tensor | None = None,
    ) -> GeneratorLoss:
        """`last_layer` (e.g. `KLAutoencoder.last_layer`) is needed once the discriminator is active.

        λ, a ratio of gradient norms, does not depend on the division by C·H·W except through its 1e-4 epsilon
        (P·1e-4 is 0.3 at 32 px, 20 at 256 px); it is computed on CompVis' unscaled nll and g_loss, so d_weight is
        exactly CompVis' and the gradients are exactly CompVis' / (C·H·W).
        Without autograd (validation) d_weight is 0, as in CompVis.
        """
        batch, pixels = inputs.shape[0], inputs[0].numel()
        diff = reconstructions - inputs
        rec = diff.abs() if self.reconstruction == "l1" else diff.pow(2)  # (B, C, H, W)
        nll_sum = rec.sum() / batch  # CompVis nll_loss with logvar = 0: Σ_pixels rec, batch mean
        perceptual = inputs.new_zeros(())
        if self.lpips is not None and self.perceptual_weight > 0:
            distance = self.lpips(inputs.contiguous(), reconstructions.contiguous())  # (B,)
            perceptual = distance.mean()
            # CompVis adds the (B,1,1,1) distance to every pixel value's |x − x̂| before summing
            nll_sum = nll_sum + self.perceptual_weight * pixels * perceptual
        kl = posterior.kl().sum() / batch
        loss = nll_sum + self.kl_weight * kl

        g_loss, d_weight = inputs.new_zeros(()), inputs.new_zeros(())
        if self.discriminator_active(global_step):
            g_loss = -self.discriminator(reconstructions.contiguous()).mean()
            if torch.is_grad_enabled() and nll_sum.requires_grad and g_loss.requires_grad:
                if last_layer is None:
                    raise ValueError("generator_loss needs last_layer once the discriminator is active")
                d_weight = self.disc_weight * adaptive_weight(
                    nll_sum, g_loss, last_layer, self.adaptive_max_weight
                )
            loss = loss + d_weight * self.disc_factor * g_loss

        return GeneratorLoss(
            loss=loss / pixels,
            rec=rec.detach().mean(),
            perceptual=perceptual.detach(),
            kl=kl.detach(),
            g_loss=g_loss.detach(),
            d_weight=d_weight,
            nll=nll_sum.detach() / pixels,
        )

    def discriminator_loss(
        self, inputs: Tensor, reconstructions: Tensor, global_step: int
    ) -> DiscriminatorLoss:
        if not self.discriminator_active(global_step):
            zero = inputs.new_zeros(())
            return DiscriminatorLoss(loss=zero, logits_real=zero, logits_fake=zero)
        # two passes, as CompVis: with BatchNorm, real and fake get their own batch statistics
        logits_real = self.discriminator(inputs.detach().contiguous())
        logits_fake = self.discriminator(reconstructions.detach().contiguous())
        loss = self.disc_factor * DISC_LOSSES[self.disc_loss](logits_real, logits_fake)
        return DiscriminatorLoss(
            loss=loss, logits_real=logits_real.detach().mean(), logits_fake=logits_fake.detach().mean()
        )
