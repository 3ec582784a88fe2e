"""`train(cfg)`: compose the parts a config names, then fit. The body of `python train.py ...`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

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


def train(cfg: DictConfig) -> dict:
    """Train one stage as `cfg` describes; returns the final checkpoint path and the last logged metrics."""
    check_config(cfg)
    stage = stage_of(cfg)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+; no effect on CPU
    run_dir = Path(cfg.run_dir)

    if stage == "diffusion":
        _adopt_autoencoder_config(cfg)
    module = build_module(cfg)
    datamodule = instantiate(cfg.data)
    logger = [instantiate(cfg.logger)] if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    trainer: L.Trainer = instantiate(
        cfg.trainer,
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
    """Stage 2 encodes with a trained stage-1 autoencoder: its architecture comes from that checkpoint."""
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
    with open_dict(cfg):
        cfg.autoencoder = OmegaConf.create(bundle["config"]["autoencoder"])
