"""Shared helpers of the latent-cache tests: a tiny stage-1 checkpoint, mixed-size image shards, caching them, and
reading a cache back."""

import tarfile

import torch

from ldm.data.latents import decode_latents_member
from ldm.inference import load_autoencoder
from ldm.latent_cache import cache_info, cache_latents
from ldm.models import KLAutoencoder
from ldm.utils.checkpoint import atomic_save
from ldm.utils.sd_import import stage1_checkpoint

from .helpers import write_mixed_shards

TINY_AE = {
    "_target_": "ldm.models.KLAutoencoder",
    "base_channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "latent_channels": 4,
    "num_groups": 8,
}

BUCKETS = {
    "step": 8,
    "max_ratio": 2.0,
}  # at base 32: (40, 24), (32, 32), (24, 40); the tiny autoencoder halves them
MIXED = [(32, 32), (24, 40), (40, 24), (26, 48), (36, 30)]  # stored (width, height), one per key in turn


def tiny_ae_checkpoint(folder) -> str:
    """A stage-1 checkpoint as train.py writes it (random weights: a cache's job is bookkeeping, not quality)."""
    torch.manual_seed(0)
    arch = {k: v for k, v in TINY_AE.items() if k != "_target_"}
    path = folder / "last.ckpt"
    atomic_save(
        stage1_checkpoint(arch, KLAutoencoder(**arch).state_dict(), latent_scale=None, resolution=32), path
    )
    return path


def mixed_image_shards(folder):
    """3 shards of 10 images of the MIXED sizes in turn: (folder, key → (w, h), key → original (h, w))."""
    sizes = {f"{i:09d}": MIXED[i % len(MIXED)] for i in range(30)}
    originals = write_mixed_shards(folder, 3, 10, sizes)  # every third original size from the json
    return folder, sizes, originals


def cache_shards(ae_ckpt, shards, out, crop="center", buckets=None, **kwargs):
    ae, bundle = load_autoencoder(ae_ckpt)
    text_encoder = kwargs.pop("text_encoder", None)
    resolution = kwargs.pop("resolution", 32)
    info = cache_info(ae_ckpt, bundle, resolution, crop, text_encoder, str(shards), ae)
    return cache_latents(
        ae,
        str(shards),
        out,
        resolution,
        batch_size=kwargs.pop("batch_size", 6),
        crop=crop,
        text_encoder=text_encoder,
        num_workers=kwargs.pop("num_workers", 0),
        info=info,
        progress=False,
        buckets=buckets,
        **kwargs,
    )


def cache_members(out) -> dict[str, dict]:
    """key → decoded latents member of every sample of a cache."""
    return {
        key: decode_latents_member(data)
        for path in sorted(out.glob("*.tar"))
        for key, data in tar_members(path, "latents.safetensors")
    }


def tar_members(path, ext):
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, member_ext = member.name.partition(".")
            if member_ext == ext:
                yield key, tar.extractfile(member).read()


def latent_run(cache, batch_size: int, steps: int) -> list[str]:
    """Overrides of a tiny stage-2 run on the cached latents in `cache`, logging to CSV, without sample grids."""
    return [
        "experiment=tiny",
        "data=latents",
        f"data.train_urls={cache}",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        f"data.shuffle_buffer={2 * batch_size}",
        f"trainer.max_steps={steps}",
        "optim.warmup_steps=1",
        "logger=csv",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.sample_grid.at_train_end=false",
    ]
