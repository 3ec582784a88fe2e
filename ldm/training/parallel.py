"""How a run is spread over processes: the Slurm allocation, the sharding strategy, stage 1's DDP, and the
global batch with the learning rate scaled to it."""

from __future__ import annotations

import logging
import math
import os

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig

from ldm.training.fsdp import is_sharded

log = logging.getLogger(__name__)


def cluster_settings(cfg: DictConfig) -> tuple[dict, list]:
    """Under Slurm: devices and nodes from the allocation (Lightning refuses others), and its environment
    (ranks, master address/port from the job). Requeueing is `PreemptionCallback`'s, not Lightning's."""
    if not SLURMEnvironment.detect():
        return {}, []
    nodes = int(os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or 1)
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    devices = int(per_node) if per_node.isdigit() else int(os.environ["SLURM_NTASKS"]) // nodes
    if (cfg.trainer.get("devices"), cfg.trainer.get("num_nodes")) != (devices, nodes):
        log.info("Slurm allocation: trainer.devices=%d trainer.num_nodes=%d", devices, nodes)
    return {"devices": devices, "num_nodes": nodes}, [SLURMEnvironment(auto_requeue=False)]


def sharding_strategy(cfg: DictConfig, stage: str) -> dict:
    """`strategy=fsdp` (configs/strategy/): a strategy object that replaces `trainer.strategy`."""
    if not cfg.get("strategy"):
        return {}
    if stage != "diffusion":
        raise ValueError(
            "strategy=fsdp shards the UNet of stage 2; stage 1 trains with DDP (trainer.strategy)"
        )
    overrides = {"strategy": instantiate(cfg.strategy)}
    if cfg.data.get("val_urls"):
        # a sharded forward is a collective: ranks with unequal numbers of held-out batches would wait forever
        log.warning(
            "strategy=fsdp: the held-out loss (data.val_urls) is not computed; eval callbacks still run"
        )
        overrides["limit_val_batches"] = 0
    return overrides


def allow_idle_discriminator(module: L.LightningModule, trainer: L.Trainer) -> None:
    """Stage 1 under DDP: the discriminator has no gradients before `disc_start`, which plain DDP refuses at the
    second step ("parameters that were not used"). Its DDP is built with `find_unused_parameters` however the
    strategy was named (`auto` with several devices, `ddp`, torchrun, Slurm)."""
    loss = getattr(module, "loss", None)
    if getattr(loss, "discriminator", None) is None or not isinstance(trainer.strategy, DDPStrategy):
        return
    trainer.strategy._ddp_kwargs["find_unused_parameters"] = True  # read when it wraps the module in fit


def scale_lr(cfg: DictConfig, module: L.LightningModule, trainer: L.Trainer) -> dict:
    """Global batch = per-device batch × devices × nodes × accumulation; optim.lr scaled by `lr_scaling`
    (none | linear | sqrt) relative to `base_batch_size`. The numbers go into the logged config (`derived`)."""
    global_batch = cfg.data.batch_size * trainer.world_size * trainer.accumulate_grad_batches
    rule = cfg.get("lr_scaling") or "none"
    ratio = global_batch / cfg.get("base_batch_size", global_batch)
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}.get(rule)
    if factor is None:
        raise ValueError(f"lr_scaling must be none, linear or sqrt, got {rule!r}")
    settings = module.optim_settings
    base_lr = settings.lr
    settings.lr = base_lr * factor
    return {
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "global_batch_size": global_batch,
        "lr_scaling": rule,
        "base_lr": base_lr,
        "lr": settings.lr,
        "strategy": type(trainer.strategy).__name__,
        "precision": trainer.precision,
        **(trainer.strategy.describe() if is_sharded(trainer.strategy) else {}),
    }
