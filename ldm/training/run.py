"""`train(cfg)`: compose the parts a config names, then fit. The body of `python train.py ...`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.data.latents import read_cache_info
from ldm.inference import LatentCodec
from ldm.training.checkpoint_io import AtomicCheckpointIO
from ldm.utils.checkpoint import load_bundle, submodule_state
from ldm.utils.hydra_build import (
    build_autoencoder,
    build_denoising_parts,
    check_config,
    import_target,
    to_plain,
)

log = logging.getLogger(__name__)
# the frozen text encoder, autoencoder and EMA copy are in eval mode on purpose
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict:
    """Train one stage as `cfg` describes; returns the final checkpoint path and the last logged metrics.

    `extra_callbacks` join those of the config (benchmarks and tests use it to observe a run)."""
    check_config(cfg)
    stage = stage_of(cfg)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+; no effect on CPU
    run_dir = Path(cfg.run_dir)

    if stage == "diffusion":
        _adopt_autoencoder_config(cfg)
    else:
        _cache_info(cfg)  # refuses cached latents as stage-1 data
    module = build_module(cfg)
    datamodule = instantiate(cfg.data)
    logger = [instantiate(cfg.logger)] if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += list(extra_callbacks)
    trainer_overrides = {}
    if not module.automatic_optimization:  # the module clips each of its optimizers itself
        module.gradient_clip_val = cfg.trainer.get("gradient_clip_val")
        trainer_overrides["gradient_clip_val"] = None
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        **trainer_overrides,
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    if logger and trainer.is_global_zero:
        logger[0].log_hyperparams(to_plain(cfg))
    log.info("stage %s: run dir %s", stage, run_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        final = run_dir / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(final)  # the state at max_steps, whatever the periodic interval
    finally:
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger) and lg._experiment is not None:
                lg.experiment.finish()  # a later train() in this process starts its own run
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return {
        "checkpoint": str(final),
        "run_dir": str(run_dir),
        "metrics": metrics,
        "global_step": trainer.global_step,
    }


def build_module(cfg: DictConfig) -> L.LightningModule:
    make_module = instantiate(cfg.stage)  # a partial of the stage's LightningModule
    optim = instantiate(cfg.optim)
    plain = to_plain(cfg)
    if stage_of(cfg) == "autoencoder":
        return make_module(autoencoder=build_autoencoder(cfg), optim=optim, config=plain)
    parts = build_denoising_parts(cfg)
    _check_cached_text_encoder(cfg, parts["text_encoder"])
    codec = LatentCodec(build_autoencoder(cfg), scale=cfg.get("latent_scale"))
    if cfg.autoencoder_ckpt:
        bundle, ckpt = load_bundle(cfg.autoencoder_ckpt)
        codec.autoencoder.load_state_dict(submodule_state(ckpt["state_dict"], "autoencoder"))
        if cfg.get("latent_scale") is None and bundle.get("latent_scale") is not None:
            codec.scale.fill_(bundle["latent_scale"])
            codec.shift.fill_(bundle.get("latent_shift", 0.0))
    return make_module(
        unet=parts["unet"],
        diffusion=parts["diffusion"],
        text_encoder=parts["text_encoder"],
        codec=codec,
        optim=optim,
        config=plain,
    )


def stage_of(cfg: DictConfig) -> str:
    """ "autoencoder" or "diffusion": the `stage` attribute of the LightningModule the `stage` group names."""
    return import_target(cfg.stage._target_).stage


def _adopt_autoencoder_config(cfg: DictConfig) -> None:
    """Stage 2 encodes with a trained stage-1 autoencoder: its architecture comes from that checkpoint. With cached
    latents, the checkpoint and resolution default to the cache's, and must match it."""
    cache = _cache_info(cfg)
    with open_dict(cfg):
        if cache is not None:
            cfg.autoencoder_ckpt = cfg.autoencoder_ckpt or cache.get("autoencoder_checkpoint")
            cfg.data.resolution = cfg.data.get("resolution") or cache.get("resolution")
    if not cfg.autoencoder_ckpt:
        raise ValueError(
            "stage 2 (diffusion) needs a trained autoencoder: set autoencoder_ckpt=path/to/stage1/last.ckpt "
            "(train one with `python train.py experiment=vae_tiny` or `experiment=vae_laion_256`)"
        )
    bundle, _ = load_bundle(cfg.autoencoder_ckpt)
    if bundle.get("stage") != "autoencoder":
        raise ValueError(
            f"autoencoder_ckpt={cfg.autoencoder_ckpt} is a '{bundle.get('stage')}' checkpoint, not stage 1"
        )
    if cache is not None and cache.get("autoencoder") not in (None, bundle["config"]["autoencoder"]):
        raise ValueError(
            f"the cached latents in {cfg.data.train_urls} were made by another autoencoder than "
            f"autoencoder_ckpt={cfg.autoencoder_ckpt} (architectures differ)"
        )
    with open_dict(cfg):
        cfg.autoencoder = OmegaConf.create(bundle["config"]["autoencoder"])
    if cfg.data.get("resolution") is None:
        raise ValueError(
            "data.resolution is not set and the cached shards have no cache_info.json to take it from"
        )


def _cache_info(cfg: DictConfig) -> dict | None:
    """The cache_info.json of cached-latent training data; None for image data (or remote caches)."""
    if getattr(import_target(cfg.data._target_), "provides", "images") != "latents":
        return None
    if stage_of(cfg) != "diffusion":
        raise ValueError("cached latents (data=latents) are for stage 2; stage 1 trains on images")
    return read_cache_info(cfg.data.train_urls)


def _check_cached_text_encoder(cfg: DictConfig, text_encoder) -> None:
    cache = _cache_info(cfg)
    cached = (cache or {}).get("text_encoder")
    if cached is not None and cached != text_encoder.identity():
        raise ValueError(
            f"the cached text encodings were made by text encoder {cached}, but this run's text encoder is "
            f"{text_encoder.identity()}; set text_encoder= to match, or cache again"
        )
