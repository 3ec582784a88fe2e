"""Text → image with a trained latent diffusion model: load a checkpoint bundle, encode prompts, sample, decode.

Never imports `ldm.training`: a checkpoint describes itself (config, weights, latent scale), so sampling needs
nothing but the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ldm.conditioning import Conditioning, FrozenOpenCLIPTextEncoder
from ldm.data.masks import inpainting_input
from ldm.diffusion import GaussianDiffusion, InitImage, autoguidance, classifier_free_guidance
from ldm.models import CrossAttentionUNet, KLAutoencoder
from ldm.models.unet import default_micro_conditioning
from ldm.utils.checkpoint import CONTENTS_KEY, WEIGHTS_ONLY, load_bundle, submodule_state

Denoiser = Callable[[Tensor, Tensor, Conditioning], Tensor]


def unet_denoiser(
    unet: CrossAttentionUNet, concat: Tensor | None = None, micro: Tensor | None = None
) -> Denoiser:
    """The one denoiser contract (DESIGN.md §1): (x_t, t, cond) → network output in the model's parameterization.

    concat: (B, K, h, w) extra input channels given to the network with x_t (an inpainting model's mask and
    masked latents); a batch that is a multiple of B (classifier-free guidance's [uncond; cond]) gets them repeated.
    micro: (B, 6) SDXL size and crop conditioning (`ldm.models.unet.micro_conditioning`) for a UNet built with
    `micro_conditioning`, repeated alike.
    """

    def denoise(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if concat is not None:
            extra = concat.to(x.dtype)
            x = torch.cat([x, extra.repeat(x.shape[0] // extra.shape[0], 1, 1, 1)], dim=1)
        extra_inputs = {}
        if micro is not None:
            extra_inputs["micro"] = micro.repeat(x.shape[0] // micro.shape[0], 1)
        return unet(
            x, t, cond.tokens, pooled=cond.pooled, **extra_inputs
        )  # pooled is used only by UNets built with pooled_dim

    return denoise


def is_inpainting_unet(unet: CrossAttentionUNet) -> bool:
    """An inpainting UNet takes [x_t, mask, masked latents]: 2 C + 1 input channels for C output channels."""
    return unet.in_channels == 2 * unet.out_channels + 1


class LatentCodec(nn.Module):
    """The autoencoder plus the latent normalisation measured for it: z_model = (z - shift) · scale.

    `scale` is NaN until measured (stage 2 measures it on its first batch when the autoencoder checkpoint has none);
    both are buffers, so they are saved with and restored from every checkpoint.
    """

    def __init__(self, autoencoder: KLAutoencoder, scale: float | None = None, shift: float = 0.0) -> None:
        super().__init__()
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.register_buffer("scale", torch.tensor(float("nan") if scale is None else float(scale)))
        self.register_buffer("shift", torch.tensor(float(shift)))

    @property
    def is_calibrated(self) -> bool:
        return bool(torch.isfinite(self.scale))

    def train(self, mode: bool = True) -> LatentCodec:
        return super().train(False)  # frozen

    def normalize(self, z: Tensor) -> Tensor:
        """Autoencoder latents → the diffusion model's latents."""
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def encode(self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        posterior = self.autoencoder.encode(images)
        return self.normalize(posterior.sample(generator) if sample else posterior.mode())

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode(z / self.scale + self.shift)


class TextToImage:
    def __init__(
        self,
        unet: CrossAttentionUNet,
        codec: LatentCodec,
        text_encoder: FrozenOpenCLIPTextEncoder,
        diffusion: GaussianDiffusion,
        image_size: int | tuple[int, int] = 256,
    ) -> None:
        self.unet, self.codec, self.text_encoder, self.diffusion = unet, codec, text_encoder, diffusion
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.guide: CrossAttentionUNet | None = None  # autoguidance's weaker model (`load_guide`)
        self.guide_info: dict | None = None
        self._bundle: dict | None = None  # the checkpoint's self-description (from_checkpoint)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> TextToImage:
        for m in (self.unet, self.codec, self.text_encoder, self.guide):
            if m is not None:
                m.to(device)
        return self

    def load_guide(self, path: str | os.PathLike, use_ema: bool = True) -> TextToImage:
        """Guide with a weaker model (autoguidance, Karras et al. 2024) instead of the unconditional output: a
        stage-2 checkpoint trained for less and/or smaller (`unet=` of another width), in the same latent space, with
        the same text encoder and the same diffusion (schedule and parameterization). Anything else is refused,
        naming the difference. Only its UNet is kept."""
        other, bundle = TextToImage.from_checkpoint(path, use_ema=use_ema)
        mine = self._bundle or {}
        problems = []
        if (mine.get("config") or {}).get("diffusion") != bundle["config"].get("diffusion"):
            problems.append(
                f"diffusion {bundle['config'].get('diffusion')} ≠ {(mine.get('config') or {}).get('diffusion')}"
            )
        if not _same_state(self.codec, other.codec):
            problems.append("another autoencoder or latent scale/shift (the latent spaces differ)")
        if not _same_state(self.text_encoder, other.text_encoder):
            problems.append("another text encoder (other weights or architecture)")
        for attr in ("in_channels", "out_channels", "micro_conditioning"):
            if getattr(self.unet, attr, None) != getattr(other.unet, attr, None):
                problems.append(
                    f"UNet {attr} {getattr(other.unet, attr, None)} ≠ {getattr(self.unet, attr, None)}"
                )
        if problems:
            raise ValueError(f"guide_ckpt={path} cannot guide this model: " + "; ".join(problems))
        self.guide = other.unet.to(self.device).eval()
        self.guide_info = {
            "path": str(Path(path).resolve()),
            "name": bundle["config"].get("name"),
            "use_ema": use_ema,
            "unet_params": sum(p.numel() for p in self.guide.parameters()),
        }
        return self

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.codec.autoencoder.downsample_factor
        multiple = f * self.unet.downsample_factor  # any size whose latent passes the UNet's downsamplings
        if height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple} (autoencoder factor {f} × UNet "
                f"downsampling {self.unet.downsample_factor}), got {height}x{width}"
            )
        return (self.unet.out_channels, height // f, width // f)

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        sampler: Callable,
        guidance_scale: float = 5.0,
        seeds: Sequence[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        progress: bool = False,
        guidance_rescale: float = 0.0,
        init_image: Tensor | None = None,
        strength: float = 1.0,
        mask: Tensor | None = None,
        keep_unmasked_pixels: bool = True,
        negative_prompt: str | Sequence[str] | None = None,
        guidance_interval: Sequence[float] | None = None,
    ) -> Tensor:
        """Images (B, 3, H, W) in [0, 1]; seed i fixes the initial noise of prompt i whatever the batch. A single
        string is one prompt (a str is also a sequence of one-character strings).

        txt2img without ``init_image``. img2img: ``init_image`` (B or 1, 3, H, W) in [0, 1] and ``strength``.
        Inpainting (any model): also ``mask`` (B or 1, 1, H, W), 1 = repaint, 0 = keep; a latent cell is repainted
        when any of its pixels is ≥ 0.5, and with ``keep_unmasked_pixels`` the kept pixels are pasted back exactly
        (blended by a soft mask's values).
        An inpainting-specialised UNet (`is_inpainting_unet`) is given the mask and the kept latents as input
        instead of having the kept region replaced at each step; without an image it is told to generate
        everything (txt2img).
        ``negative_prompt`` (one for all prompts, or one per prompt) replaces the empty prompt in the unconditional
        half of classifier-free guidance, so the samples are steered away from it; None or "" is the empty prompt.
        ``guidance_interval`` (sigma_lo, sigma_hi): guide only the steps whose noise level sigma is in
        (sigma_lo, sigma_hi] (`ldm.diffusion.classifier_free_guidance`); None guides every step.
        With a guide model (`load_guide`) the guidance is autoguidance: the guide's conditional output takes the
        unconditional one's place (`ldm.diffusion.autoguidance`).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if init_image is not None:
            height, width = init_image.shape[-2:]
        height, width = height or self.image_size[0], width or self.image_size[1]
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        shape = self.latent_shape(height, width)
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        )
        cond = self.text_encoder(list(prompts))
        init = self._init(init_image, strength, mask, len(prompts))
        concat = None
        if is_inpainting_unet(self.unet):
            concat, init = self._inpainting_input(init, len(prompts), shape)
        micro = self._micro(len(prompts), height, width)
        interval = None if guidance_interval is None else tuple(guidance_interval)
        if self.guide is not None:
            if negative_prompt is not None and any(
                [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            ):
                raise ValueError(
                    "a negative prompt steers classifier-free guidance; with a guide model (autoguidance) both "
                    "passes see the prompt itself: drop guide_ckpt or negative_prompt"
                )
            model_fn = autoguidance(
                unet_denoiser(self.unet, concat, micro),
                unet_denoiser(self.guide, concat, micro),
                cond,
                guidance_scale,
                rescale=guidance_rescale,
                interval=interval,
                sigma_at=self.diffusion.sigma_at,
            )
        else:
            uncond = self._unconditional(len(prompts), negative_prompt) if guidance_scale != 1.0 else None
            model_fn = classifier_free_guidance(
                unet_denoiser(self.unet, concat, micro),
                cond,
                uncond,
                guidance_scale,
                cat=Conditioning.cat,
                rescale=guidance_rescale,
                interval=interval,
                sigma_at=self.diffusion.sigma_at,
            )
        generator = torch.Generator(self.device).manual_seed(step_noise_seed(seeds[0]))
        z = sampler(
            model_fn, self.diffusion, noise.to(self.device), generator=generator, progress=progress, init=init
        )
        images = ((self.codec.decode(z) + 1) / 2).clamp(0, 1)
        if mask is not None and keep_unmasked_pixels:
            images = torch.lerp(init_image.to(images), images, mask.to(images))
        return images

    def _unconditional(self, batch: int, negative_prompt: str | Sequence[str] | None) -> Conditioning:
        """The conditioning guidance steers away from: the empty prompt, or the negative prompt(s)."""
        negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else negative_prompt
        if negatives is None or not any(negatives):
            return self.text_encoder.null(batch)
        if len(negatives) != batch:
            raise ValueError(f"got {batch} prompts but {len(negatives)} negative prompts")
        return self.text_encoder(list(negatives))

    def _micro(self, batch: int, height: int, width: int) -> Tensor | None:
        """A micro-conditioned UNet samples as if for an uncropped image of the requested size (SDXL's default)."""
        if not getattr(self.unet, "micro_conditioning", False):
            return None
        return default_micro_conditioning(batch, height, width, self.device)

    def _init(
        self, image: Tensor | None, strength: float, mask: Tensor | None, batch: int
    ) -> InitImage | None:
        """The image's latents (posterior mode) and the mask at latent resolution, for the sampler."""
        if image is None:
            if mask is not None:
                raise ValueError("a mask needs an init_image")
            return None
        image = image.to(self.device, torch.float32)
        latents = self.codec.encode(image * 2 - 1, sample=False).expand(batch, -1, -1, -1)
        latent_mask = None
        if mask is not None:
            if mask.shape[-2:] != image.shape[-2:]:
                raise ValueError(
                    f"mask size {tuple(mask.shape[-2:])} differs from image size {tuple(image.shape[-2:])}"
                )
            f = self.codec.autoencoder.downsample_factor
            # a soft mask is cut at 0.5 first, as diffusers does: the sampler's per-step replacement and an
            # inpainting UNet's mask channel take 0 or 1 (the final paste-back below keeps the soft edge)
            binary = (mask.to(self.device, torch.float32) >= 0.5).float()
            latent_mask = torch.nn.functional.max_pool2d(binary, f)
        return InitImage(latents, strength=strength, mask=latent_mask)

    def _inpainting_input(
        self, init: InitImage | None, batch: int, shape: tuple[int, int, int]
    ) -> tuple[Tensor, InitImage | None]:
        """An inpainting UNet's extra channels, and the sampler's start without the per-step replacement."""
        latents = torch.zeros(batch, *shape, device=self.device)
        mask = torch.ones(batch, 1, *shape[1:], device=self.device)
        if init is not None:
            latents = init.latents
            if init.mask is not None:
                mask = init.mask.expand(batch, 1, -1, -1)
            init = InitImage(init.latents, strength=init.strength) if init.strength < 1.0 else None
        return inpainting_input(latents, mask), init

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, use_ema: bool = True, device: str | torch.device = "cpu"
    ) -> tuple[TextToImage, dict]:
        """Build the pipeline a diffusion checkpoint describes; returns (pipeline, self-description)."""
        from ldm.utils.hydra_build import build_autoencoder, build_denoising_parts

        bundle, ckpt = load_bundle(path)
        if bundle.get("stage") != "diffusion":
            raise ValueError(
                f"{path} is a '{bundle.get('stage')}' checkpoint; sampling needs a diffusion (stage 2) one"
            )
        if not use_ema and bundle.get(CONTENTS_KEY) == WEIGHTS_ONLY:
            raise ValueError(
                f"{path} is a weights-only checkpoint: it holds the EMA weights only (use_ema=true)"
            )
        cfg = bundle["config"]
        state = ckpt["state_dict"]
        parts = build_denoising_parts(cfg)
        unet, text_encoder = parts["unet"], parts["text_encoder"]
        unet.load_state_dict(submodule_state(state, "ema.module" if use_ema else "unet"))
        if bundle["text_encoder"]["weights_in_checkpoint"]:
            text_encoder.load_state_dict(submodule_state(state, "text_encoder"))
        codec = LatentCodec(build_autoencoder(cfg))
        codec.load_state_dict(submodule_state(state, "codec"))
        pipe = cls(unet.eval(), codec.eval(), text_encoder, parts["diffusion"], cfg["data"]["resolution"])
        pipe._bundle = bundle
        return pipe.to(device), bundle


def step_noise_seed(seed: int) -> int:
    """The seed of a batch's step-noise generator (stochastic samplers), derived from its first image's seed but
    not equal to it: a CPU generator seeded like that image's initial noise replays it as the first fresh noise the
    sampler adds to that image, which then carries too much noise along it (and is not a sample of the model).
    numpy's SeedSequence of (seed, 1) mixes the bits the same on every platform and version."""
    return int(np.random.SeedSequence([int(seed) % 2**64, 1]).generate_state(1, np.uint64)[0])


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    """The same tensors under the same names (parameters and buffers)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa
    )


def load_autoencoder(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[KLAutoencoder, dict]:
    """The autoencoder of a stage-1 checkpoint (architecture from its config), frozen, and its self-description
    (with `latent_scale` / `latent_shift` / `latent_stats` when they have been measured)."""
    from ldm.utils.hydra_build import build_autoencoder

    bundle, ckpt = load_bundle(path)
    if bundle.get("stage") != "autoencoder":
        raise ValueError(f"{path} is a '{bundle.get('stage')}' checkpoint, not a stage-1 (autoencoder) one")
    autoencoder = build_autoencoder(bundle["config"])
    autoencoder.load_state_dict(submodule_state(ckpt["state_dict"], "autoencoder"))
    return autoencoder.requires_grad_(False).eval().to(device), bundle


def read_prompts(
    prompts: str | Sequence[str] | None = None, prompts_file: str | os.PathLike | None = None
) -> list[str]:
    """Prompts from a list (a string is one prompt) and/or a text file (one per line; blank lines and lines
    starting with # skipped)."""
    if isinstance(prompts, str):  # `sample.py prompts='a red circle'`: Hydra reads it as a string, not a list
        prompts = [prompts] if prompts.strip() else []
    out = [str(p) for p in (prompts or [])]
    if prompts_file:
        lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
        out += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise ValueError(
            "no prompts: pass prompts='[a prompt, another prompt]' or prompts_file=path/to/prompts.txt"
        )
    return out
