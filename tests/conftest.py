"""Test-wide settings: no network, W&B offline, quiet."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub look-up would otherwise retry for ~45 s before failing
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> list[str]:
    """Two shards of 24 synthetic captioned shapes each (32 px JPEG, img2dataset layout), written once."""
    from ldm.data.synthetic import write_synthetic_shards

    return write_synthetic_shards(
        tmp_path_factory.mktemp("shapes"), num_samples=48, samples_per_shard=24, resolution=32, seed=0
    )
