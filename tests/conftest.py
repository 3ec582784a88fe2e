"""Test-wide settings: no network, W&B offline, quiet."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub look-up would otherwise retry for ~45 s before failing
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# a native crash in a subprocess (a training rank, a torchrun worker) prints every thread's Python stack
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

import sys
from pathlib import Path

import pytest

if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    # scripts/test.sh runs test files in parallel processes (pytest-xdist): each takes its share of the cores, and so
    # do the subprocesses it starts, instead of every process spinning one thread per core
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def one_thread():
    """One intra-op thread for a test of small tensors, whose time is per-op overhead that threads only contend
    over (files use it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first (keeping each file's order): scripts/test.sh hands whole files to the parallel
    workers in this order, so the long ones start early instead of ending the run with one worker left busy."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


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


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory):
    """The latent-cache tests' tiny stage-1 checkpoint (random weights: a cache's job is bookkeeping)."""
    from tests.latent_helpers import tiny_ae_checkpoint

    return tiny_ae_checkpoint(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """Image shards of mixed sizes and formats (tests.latent_helpers.mixed_image_shards)."""
    from tests.latent_helpers import mixed_image_shards

    return mixed_image_shards(tmp_path_factory.mktemp("mixed"))
