"""Pretrained SD autoencoder weights → an ldm stage-1 checkpoint that stage 2 takes as `autoencoder_ckpt=`.

The written file looks like one `train.py experiment=vae_*` saves, as far as stage 2 reads it: weights under
`state_dict["autoencoder.*"]` and a bundle with the autoencoder's config and (optionally) its latent scale.
Used by `scripts/import_sd_vae.py`; no Lightning, no Hydra. `import_sd_model` (scripts/import_sd.py) takes a whole
SD2-layout model: UNet, autoencoder and OpenCLIP text tower, into a stage-1 and a stage-2 checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ldm.models.autoencoder import KLAutoencoder
from ldm.models.convert_vae import convert_state_dict, read_state_dict
from ldm.utils.checkpoint import BUNDLE_KEY, CONTENTS_KEY, FORMAT_VERSION, WEIGHTS_ONLY, atomic_save
from ldm.utils.sd_config import COMPVIS_TEXT_PREFIX, sd_model_nodes

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
        from ldm.latent_stats import image_batches, measure_latent_stats

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


# --- a whole SD2-layout model (UNet + autoencoder + OpenCLIP text tower) -----------------------------------------
UNET_TARGET = "ldm.models.CrossAttentionUNet"


def _linear_projections(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """SD1-style transformers (`use_linear_in_transformer: false`) project with 1x1 convs; ours with Linear."""
    return {
        k: v[:, :, 0, 0] if v.ndim == 4 and k.endswith(("proj_in.weight", "proj_out.weight")) else v
        for k, v in state.items()
    }


def import_sd_model(
    src: str | os.PathLike, sd_config: Mapping, base_config: Mapping, out_dir: str | os.PathLike
) -> dict:
    """An SD2-layout single file (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.model.*`) and
    its inference yaml → `out_dir/autoencoder.ckpt` (stage 1, with the yaml's scale_factor as latent scale) and
    `out_dir/model.ckpt` (stage 2, weights-only: the UNet as its EMA weights, autoencoder, text tower). `base_config`:
    a resolved training config (an experiment) whose nodes the yaml's values replace. Returns the stage-2 bundle.
    `sample.py ckpt=out_dir/model.ckpt` samples it; `train.py ... init_from=out_dir/model.ckpt` trains on from it."""
    from ldm.conditioning import FrozenOpenCLIPTextEncoder
    from ldm.diffusion import GaussianDiffusion
    from ldm.models.convert_unet import unet_from_layout
    from ldm.models.convert_vae import check_state_dict, compvis_to_ldm
    from ldm.models.unet import CrossAttentionUNet

    nodes = sd_model_nodes(sd_config)
    state = _linear_projections(read_state_dict(src))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = {"path": str(Path(src).resolve()), "layout": "compvis"}

    unet = CrossAttentionUNet(**nodes["unet"])
    unet.load_state_dict(unet_from_layout(state, unet, "compvis"), strict=True)
    vae_config = nodes["autoencoder"]
    vae_state = {k: v.float() for k, v in compvis_to_ldm(state).items()}
    check_state_dict(vae_state, vae_config)
    text_state = {
        k[len(COMPVIS_TEXT_PREFIX) :]: v for k, v in state.items() if k.startswith(COMPVIS_TEXT_PREFIX)
    }
    encoder = FrozenOpenCLIPTextEncoder(**nodes["text_encoder"])
    own = encoder.text.state_dict()
    text_state = {k: v.float() for k, v in text_state.items() if k in own}  # SD files also hold logit_scale
    encoder.text.load_state_dict(text_state, strict=True)
    latent_scale, resolution = nodes["latent_scale"], nodes["resolution"]

    vae_path = out_dir / "autoencoder.ckpt"
    atomic_save(
        stage1_checkpoint(
            vae_config, vae_state, latent_scale=latent_scale, resolution=resolution, source=source
        ),
        vae_path,
    )
    config = copy.deepcopy(dict(base_config))
    config["unet"] = {"_target_": UNET_TARGET, **{**config.get("unet", {}), **nodes["unet"]}}
    config["unet"]["gradient_checkpointing"] = bool(config["unet"].get("gradient_checkpointing", False))
    config["autoencoder"] = {"_target_": AUTOENCODER_TARGET, **vae_config}
    config["text_encoder"] = {**config.get("text_encoder", {}), **nodes["text_encoder"]}
    # the yaml's schedule, without rescaling or shift (SD has neither); the base's training-only options stay
    config["diffusion"] = {
        **config.get("diffusion", {}),
        **nodes["diffusion"],
        "zero_terminal_snr": False,
        "schedule_shift": 1.0,
    }
    config.setdefault("data", {})["resolution"] = resolution
    config["autoencoder_ckpt"] = str(vae_path.resolve())
    config["latent_scale"] = None
    diffusion = GaussianDiffusion(**{k: v for k, v in config["diffusion"].items() if k != "_target_"})
    bundle = {
        "format_version": FORMAT_VERSION,
        "stage": "diffusion",
        "config": config,
        "latent_scale": latent_scale,
        "latent_shift": 0.0,
        "text_encoder": encoder.identity(),
        "diffusion": diffusion.describe(),
        CONTENTS_KEY: WEIGHTS_ONLY,  # no optimizer or data state: sample from it, or start a run from it
        "source": source,
    }
    weights = {f"ema.module.{k}": v.float() for k, v in unet.state_dict().items()}
    weights.update({f"codec.autoencoder.{k}": v for k, v in vae_state.items()})
    weights["codec.scale"] = torch.tensor(latent_scale)
    weights["codec.shift"] = torch.tensor(0.0)
    weights.update({f"text_encoder.text.{k}": v for k, v in text_state.items()})
    atomic_save(
        {"state_dict": weights, "global_step": 0, "epoch": 0, BUNDLE_KEY: bundle}, out_dir / "model.ckpt"
    )
    return bundle
