"""Pretrained SD autoencoder weights → an ldm stage-1 checkpoint that stage 2 takes as `autoencoder_ckpt=`.

The written file looks like one `train.py experiment=vae_*` saves, as far as stage 2 reads it: weights under
`state_dict["autoencoder.*"]` and a bundle with the autoencoder's config and (optionally) its latent scale.
Used by `scripts/import_sd_vae.py`; no Lightning, no Hydra.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ldm.models.autoencoder import KLAutoencoder
from ldm.models.convert_vae import convert_state_dict, read_state_dict
from ldm.utils.checkpoint import BUNDLE_KEY, FORMAT_VERSION, atomic_save

AUTOENCODER_TARGET = "ldm.models.KLAutoencoder"


def stage1_checkpoint(
    config: Mapping,
    state_dict: Mapping[str, Tensor],
    *,
    latent_scale: float | None,
    latent_shift: float = 0.0,
    resolution: int = 256,
    source: dict | None = None,
) -> dict:
    """The checkpoint dict: `state_dict` under `autoencoder.` and the `ldm` self-description."""
    if latent_scale is not None and not (math.isfinite(latent_scale) and latent_scale > 0):
        raise ValueError(f"latent_scale must be a positive finite number, got {latent_scale}")
    return {
        "state_dict": {f"autoencoder.{k}": v for k, v in state_dict.items()},
        BUNDLE_KEY: {
            "format_version": FORMAT_VERSION,
            "stage": "autoencoder",
            "config": {
                "autoencoder": {"_target_": AUTOENCODER_TARGET, **config},
                "data": {"resolution": resolution},
            },
            "latent_scale": None if latent_scale is None else float(latent_scale),
            "latent_shift": float(latent_shift),
            "downsample_factor": 2 ** (len(config["channel_mult"]) - 1),
            "source": source or {},
        },
    }


def diffusers_config_beside(path: str | os.PathLike) -> dict | None:
    """The `config.json` of a diffusers AutoencoderKL folder holding `path`, if there is one."""
    config_file = Path(path).with_name("config.json")
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("_class_name") == "AutoencoderKL" else None


def import_sd_vae(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    latent_scale: float | None = None,
    latent_shift: float = 0.0,
    measure_on: str | Sequence[str] | None = None,
    resolution: int = 256,
    num_images: int = 256,
    batch_size: int = 8,
    num_groups: int | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Convert the SD VAE file `src` (CompVis or diffusers layout) and write `out` atomically; returns the bundle.

    The latent scale is `latent_scale` if given, else measured on the shards `measure_on` if given, else left
    None (stage 2 then measures it on its first batch). `num_groups` defaults to diffusers' `norm_num_groups`
    from a `config.json` beside `src`, else 32 (SD).
    """
    if latent_scale is not None and measure_on is not None:
        raise ValueError("give either latent_scale or measure_on, not both")
    if num_groups is None:
        num_groups = int((diffusers_config_beside(src) or {}).get("norm_num_groups", 32))
    config, state_dict, layout = convert_state_dict(read_state_dict(src), num_groups=num_groups)
    latent_stats = None
    source = {"path": str(Path(src).resolve()), "layout": layout}
    if measure_on is not None:
        autoencoder = KLAutoencoder(**config)
        autoencoder.load_state_dict(state_dict, strict=True)
        autoencoder.to(device).eval()
        from ldm.latent_cache import image_batches, measure_latent_stats

        batches = image_batches(measure_on, resolution, batch_size, device=device)
        generator = torch.Generator(device).manual_seed(0)
        stats = measure_latent_stats(autoencoder.encode, batches, num_images, generator=generator)
        latent_scale, latent_stats = stats.scale, stats.as_dict()
        source["latent_scale_measured_on"] = measure_on if isinstance(measure_on, str) else list(measure_on)
    checkpoint = stage1_checkpoint(
        config,
        state_dict,
        latent_scale=latent_scale,
        latent_shift=latent_shift,
        resolution=resolution,
        source=source,
    )
    if latent_stats is not None:
        checkpoint[BUNDLE_KEY]["latent_stats"] = latent_stats
    atomic_save(checkpoint, out)
    return checkpoint[BUNDLE_KEY]
