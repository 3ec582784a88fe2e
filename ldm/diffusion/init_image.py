"""Start a sampler from an image (img2img) and keep part of it (inpainting), for any sampler and any model.

img2img (SDEdit, Meng et al. 2022): noise the image's latents to the noise level ``strength`` of the way up the
sampler's schedule and run the remaining steps. Inpainting by replacement (Song et al. 2021, appendix I.2;
RePaint, Lugmayr et al. 2022, without resampling): after every step, the kept region is overwritten with the
image's latents noised to the new level, with the same initial noise (as diffusers' legacy inpainting), so the
last step returns them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class InitImage:
    latents: Tensor  # (B, C, h, w) clean latents of the given image, in the model's (normalized) latent space
    strength: float = 1.0  # fraction of the sampler's steps that are run: 1 = from pure noise
    mask: Tensor | None = (
        None  # (B or 1, 1 or C, h, w) in [0, 1]: 1 where the sampler generates, 0 where kept
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")

    def num_steps_to_run(self, num_steps: int) -> int:
        """The last ``int(strength * num_steps)`` steps (at least one) are run, as diffusers' img2img."""
        return max(1, min(num_steps, int(num_steps * self.strength)))

    def start(self, noise: Tensor, alpha_bar: float) -> Tensor:
        """x_t at the first step run: pure noise at strength 1, else the latents noised to alpha_bar (DDPM eq. 4)."""
        if self.strength >= 1.0:
            return noise
        return math.sqrt(alpha_bar) * self.latents.to(noise.dtype) + math.sqrt(1.0 - alpha_bar) * noise

    def blend(self, x: Tensor, noise: Tensor, alpha_bar: float) -> Tensor:
        """x_t (at alpha_bar) with the kept region replaced by the image's latents noised to the same level."""
        if self.mask is None:
            return x
        known = math.sqrt(alpha_bar) * self.latents.to(x.dtype) + math.sqrt(1.0 - alpha_bar) * noise
        return torch.lerp(known, x, self.mask.to(x.dtype))

    def blend_sigma(self, x: Tensor, noise: Tensor, sigma: float) -> Tensor:
        """The same, for samplers that work on x_t / sqrt(alpha_bar) = x0 + sigma eps (k-diffusion's variable)."""
        if self.mask is None:
            return x
        known = self.latents.to(x.dtype) + sigma * noise
        return torch.lerp(known, x, self.mask.to(x.dtype))
