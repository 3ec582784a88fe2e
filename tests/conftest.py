"""Test-wide settings: no network, W&B offline, quiet."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub look-up would otherwise retry for ~45 s before failing
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> list[str]:
    """Two shards of 24 synthetic captioned shapes each (32 px JPEG, img2dataset layout), written once."""
    from ldm.data.synthetic import write_synthetic_shards

    return write_synthetic_shards(
        tmp_path_factory.mktemp("shapes"), num_samples=48, samples_per_shard=24, resolution=32, seed=0
    )


@pytest.fixture(scope="session")
def vae_ckpt(tmp_path_factory) -> str:
    """A stage-1 checkpoint of the quickstart autoencoder with its initial weights (stage 2 only needs one)."""
    import torch
    from omegaconf import OmegaConf

    from ldm.models import KLAutoencoder
    from ldm.utils.checkpoint import atomic_save
    from ldm.utils.sd_import import stage1_checkpoint

    arch = OmegaConf.to_container(
        OmegaConf.load(Path(__file__).parents[1] / "configs/autoencoder/kl_f4_tiny.yaml")
    )
    arch.pop("_target_")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae.ckpt"
    atomic_save(
        stage1_checkpoint(arch, KLAutoencoder(**arch).state_dict(), latent_scale=1.0, resolution=32), path
    )
    return str(path)
