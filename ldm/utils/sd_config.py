"""Stable Diffusion's CompVis inference yaml (`LatentDiffusion`, as `v2-inference.yaml`) ↔ ldm config values.

Written by `ldm.export` (`--format sd`) beside an SD single file, read by `ldm.utils.sd_import` (`scripts/import_sd.py`);
both directions here, so the names and defaults they share are defined once. Plain dicts: no torch, no Hydra.
"""

from __future__ import annotations

from collections.abc import Mapping

COMPVIS_TEXT_PREFIX = "cond_stage_model.model."  # SD2's FrozenOpenCLIPEmbedder keeps the open_clip model here
# our schedule names → CompVis' (its "linear" is SD's scaled-linear, its "sqrt_linear" a plain linspace)
TO_COMPVIS_SCHEDULE = {"scaled_linear": "linear", "linear": "sqrt_linear", "cosine": "cosine"}
FROM_COMPVIS_SCHEDULE = {theirs: ours for ours, theirs in TO_COMPVIS_SCHEDULE.items()}


def compvis_schedule(diffusion: Mapping) -> str:
    """CompVis' name for our GaussianDiffusion node's schedule; a ValueError when it has none."""
    if diffusion.get("prediction") == "flow":
        raise ValueError(
            "rectified flow has no CompVis form (its LatentDiffusion samples Gaussian eps / v models only): export "
            "in diffusers format, whose scheduler is then FlowMatchEulerDiscreteScheduler"
        )
    if (
        diffusion.get("zero_terminal_snr")
        or float(diffusion.get("schedule_shift", 1.0)) != 1.0
        or diffusion["schedule"] not in TO_COMPVIS_SCHEDULE
    ):
        described = {k: v for k, v in diffusion.items() if k != "_target_"}
        raise ValueError(
            f"the training schedule ({described}) has no CompVis name (zero-terminal-SNR rescaling and schedule "
            "shifts cannot be written in an SD inference yaml): export in diffusers format, whose scheduler holds "
            "the exact betas"
        )
    return TO_COMPVIS_SCHEDULE[diffusion["schedule"]]


def sd_inference_config(
    unet_params: Mapping,
    vae: Mapping,
    diffusion: Mapping,
    text_identity: Mapping,
    latent_scale: float,
    latent_size: int,
    resolution: int,
) -> dict:
    """The inference config (`v2-inference.yaml` style) of an SD single file: `unet_params` as
    `convert_unet.compvis_unet_params` gives them, `vae` our KLAutoencoder kwargs, `diffusion` our GaussianDiffusion
    node, `text_identity` the text encoder's as a checkpoint records it. A ValueError when the schedule has no
    CompVis name (`compvis_schedule`)."""
    return {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "parameterization": diffusion["prediction"],  # eps / v / x0: the same names as ours
                "beta_schedule": compvis_schedule(diffusion),
                "linear_start": float(diffusion.get("beta_start", 0.00085)),
                "linear_end": float(diffusion.get("beta_end", 0.012)),
                "num_timesteps_cond": 1,
                "log_every_t": 200,
                "timesteps": diffusion["num_timesteps"],
                "first_stage_key": "jpg",
                "cond_stage_key": "txt",
                "image_size": latent_size,
                "channels": vae["latent_channels"],
                "cond_stage_trainable": False,
                "conditioning_key": "crossattn",
                "monitor": "val/loss_simple_ema",
                "scale_factor": latent_scale,
                "use_ema": False,
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": unet_params,
                },
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {
                        "embed_dim": vae["latent_channels"],
                        "monitor": "val/rec_loss",
                        "ddconfig": {
                            "double_z": True,
                            "z_channels": vae["latent_channels"],
                            "resolution": resolution,
                            "in_channels": vae["in_channels"],
                            "out_ch": vae["out_channels"],
                            "ch": vae["base_channels"],
                            "ch_mult": list(vae["channel_mult"]),
                            "num_res_blocks": vae["num_res_blocks"],
                            "attn_resolutions": [],
                            "dropout": 0.0,
                            "attn_type": "vanilla" if vae["mid_attention"] else "none",
                        },
                        "lossconfig": {"target": "torch.nn.Identity"},
                    },
                },
                "cond_stage_config": {
                    "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                    "params": {
                        "freeze": True,
                        "layer": text_identity["layer"],
                        "arch": text_identity["model_name"],
                        "version": text_identity["pretrained"]
                        if isinstance(text_identity["pretrained"], str)
                        else None,
                    },
                },
            },
        }
    }


def sd_model_nodes(sd_config: Mapping) -> dict:
    """ldm config values read off an SD inference yaml (CompVis `LatentDiffusion`, as `v2-inference.yaml` or an
    `export --format sd` writes): `unet`, `autoencoder`, `diffusion`, `text_encoder` keyword arguments, `latent_scale`
    and `resolution`. A ValueError names what ldm's networks cannot hold (SD1's OpenAI-CLIP tower, class- or
    image-conditioned UNets, inpainting models)."""
    model = sd_config.get("model") or {}
    params = model.get("params") or {}
    if not str(model.get("target", "")).endswith(".LatentDiffusion") or params.get(
        "conditioning_key"
    ) not in (
        None,
        "crossattn",
    ):
        raise ValueError(
            f"{model.get('target')} with conditioning_key={params.get('conditioning_key')!r}: only text-to-image "
            "LatentDiffusion models (crossattn) import; inpainting and other variants do not"
        )
    cond = params.get("cond_stage_config") or {}
    if not str(cond.get("target", "")).endswith("FrozenOpenCLIPEmbedder"):
        raise ValueError(
            f"text encoder {cond.get('target')}: ldm's is OpenCLIP (SD2's FrozenOpenCLIPEmbedder); SD1's OpenAI "
            "CLIP tower does not import"
        )
    unet = dict(params["unet_config"]["params"])
    unsupported = [k for k in ("num_classes", "adm_in_channels", "disable_self_attentions") if unet.get(k)]
    if unsupported:
        raise ValueError(f"the UNet uses {', '.join(unsupported)}, which ldm's UNet has no counterpart for")
    depth = unet.get("transformer_depth", 1)
    if not isinstance(depth, int):
        if len(set(depth)) != 1:
            raise ValueError(f"transformer_depth {depth} varies by level; ldm's UNet has one depth")
        depth = depth[0]
    if unet.get("num_head_channels", -1) != -1:  # SD2: a fixed head width
        heads = {"head_dim": unet["num_head_channels"], "num_heads": None}
    else:  # SD1: a fixed head count
        heads = {"head_dim": None, "num_heads": unet["num_heads"]}
    ddconfig = params["first_stage_config"]["params"]["ddconfig"]
    if not ddconfig.get("double_z", True) or ddconfig.get("attn_resolutions"):
        raise ValueError("the autoencoder has attention outside its middle block or no KL posterior")
    factor = 2 ** (len(ddconfig["ch_mult"]) - 1)
    schedule = params.get("beta_schedule", "linear")  # CompVis' defaults throughout
    if schedule not in FROM_COMPVIS_SCHEDULE:
        raise ValueError(
            f"beta_schedule {schedule!r} has no ldm counterpart ({', '.join(FROM_COMPVIS_SCHEDULE)})"
        )
    cond_params = cond.get("params") or {}
    return {
        "unet": {
            "in_channels": unet["in_channels"],
            "out_channels": unet["out_channels"],
            "model_channels": unet["model_channels"],
            "channel_mult": list(unet["channel_mult"]),
            "num_res_blocks": unet["num_res_blocks"],
            "attention_resolutions": list(unet["attention_resolutions"]),
            **heads,
            "transformer_depth": depth,
            "context_dim": unet["context_dim"]
            if isinstance(unet["context_dim"], int)
            else unet["context_dim"][0],
            "num_groups": 32,
            "pooled_dim": None,
            "micro_conditioning": False,
            "qk_norm": False,  # SD's attention does not normalise queries and keys
        },
        "autoencoder": {
            "in_channels": ddconfig["in_channels"],
            "out_channels": ddconfig["out_ch"],
            "base_channels": ddconfig["ch"],
            "channel_mult": list(ddconfig["ch_mult"]),
            "num_res_blocks": ddconfig["num_res_blocks"],
            "latent_channels": ddconfig["z_channels"],
            "mid_attention": ddconfig.get("attn_type", "vanilla") != "none",
            "dropout": 0.0,
            "num_groups": 32,
        },
        "diffusion": {
            "schedule": FROM_COMPVIS_SCHEDULE[schedule],
            "num_timesteps": params.get("timesteps", 1000),
            "prediction": params.get("parameterization", "eps"),  # the same names as ours
            "beta_start": params.get("linear_start", 1e-4),
            "beta_end": params.get("linear_end", 2e-2),
        },
        "text_encoder": {
            "model_name": cond_params.get("arch", "ViT-H-14"),
            "pretrained": None,  # its weights travel in the checkpoint, taken from the SD file
            "layer": cond_params.get("layer", "last"),
            "context_length": None,  # the tower's own (ViT-H-14: 77, FrozenOpenCLIPEmbedder's max_length)
        },
        "latent_scale": float(params.get("scale_factor", 1.0)),
        # LatentDiffusion's image_size is the latent side (SD2-base: 64 → 512 px); the UNet's is marked unused
        "resolution": int(params.get("image_size", unet.get("image_size", 64))) * factor,
    }
