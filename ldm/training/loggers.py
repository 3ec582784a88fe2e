"""Weights & Biases logger that runs offline, without asking, when no API key is configured."""

from __future__ import annotations

import os
from collections.abc import Sequence

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from ldm.utils.wandb_mode import wandb_offline


def wandb_logger(
    project: str = "ldm",
    name: str | None = None,
    save_dir: str = ".",
    offline: bool | None = None,
    entity: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    id: str | None = None,
    log_model: bool = False,
    resume: str | None = None,
) -> WandbLogger:
    """offline=None: online if an API key is configured (WANDB_API_KEY or `wandb login`), else offline.

    Offline runs are written under `save_dir/wandb/` and can be uploaded later with `wandb sync`.
    `id` with `resume="allow"` continues that run (`run.train` sets both, so a requeued job logs into its run).
    """
    if offline is None:
        offline = wandb_offline()
        if offline:
            rank_zero_info(
                f"W&B: no API key found, logging offline to {save_dir}/wandb (upload later: wandb sync)"
            )
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        offline=offline,
        entity=entity,
        group=group,
        tags=list(tags),
        id=id,
        log_model=log_model,
        **({"resume": resume} if resume else {}),
    )
