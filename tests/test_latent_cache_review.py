"""Review of the cached-latent path: the encoder digest of a 16-bit stage-1 checkpoint, caches spanning several
folders, latent statistics pooled over ranks, and the caching job's rank."""

import hashlib
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.data.latents import CACHE_INFO, encoder_digest, read_cache_info
from ldm.data.synthetic import write_synthetic_shards
from ldm.latent_stats import LatentMoments
from ldm.models import KLAutoencoder
from ldm.utils.checkpoint import atomic_save
from ldm.utils.sd_import import stage1_checkpoint

from .helpers import compose_train
from .latent_helpers import TINY_AE, cache_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("images")
    write_synthetic_shards(out, num_samples=8, samples_per_shard=4, resolution=32, seed=1)
    return out


def _checkpoint(path, seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    arch = {k: v for k, v in TINY_AE.items() if k != "_target_"}
    state = {
        k: v.to(dtype) if v.is_floating_point() else v for k, v in KLAutoencoder(**arch).state_dict().items()
    }
    atomic_save(stage1_checkpoint(arch, state, latent_scale=None, resolution=32), path)
    return path, state


def _sha256_as_before(state: dict) -> str:
    """The digest's formula as caches recorded it (names, dtypes, shapes, bytes of encoder.* / quant_conv.*)."""
    digest = hashlib.sha256()
    for name in sorted(k for k in state if k.startswith(("encoder.", "quant_conv."))):
        tensor = state[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def test_training_accepts_the_cache_of_a_bf16_stage1_checkpoint(shards, tmp_path):
    """`precision: bf16-true` stores stage-1 weights in bf16; the cache hashes the loaded float32 module, training
    the checkpoint as stored: both must name the same encoder (they refused each other, naming the same file)."""
    from ldm.training.run import _adopt_autoencoder_config

    ckpt, state = _checkpoint(tmp_path / "bf16.ckpt", seed=0, dtype=torch.bfloat16)
    cache_shards(ckpt, shards, tmp_path / "cache")
    cfg = compose_train("experiment=tiny", "data=latents", f"data.train_urls={tmp_path / 'cache'}")
    _adopt_autoencoder_config(cfg)
    assert cfg.autoencoder_ckpt == str(ckpt.resolve())
    # the bf16 weights hash as their exact float32 values; float32 weights as caches already record them
    upcast = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    assert encoder_digest(state) == encoder_digest(upcast) == _sha256_as_before(upcast)
    assert encoder_digest(state) != encoder_digest(
        {**upcast, "encoder.conv_in.bias": upcast["encoder.conv_in.bias"] + 1}
    )


def test_a_run_on_several_cache_folders_refuses_one_from_another_encoder(shards, tmp_path):
    """Training checks the cache_info.json of the first folder of data.train_urls: a second folder encoded by other
    weights (or at another size) would have been trained on unnoticed."""
    from ldm.training.run import _adopt_autoencoder_config

    ours, _ = _checkpoint(tmp_path / "ours.ckpt", seed=0)
    other, _ = _checkpoint(tmp_path / "other.ckpt", seed=1)  # the same architecture, other weights
    cache_shards(ours, shards, tmp_path / "a")
    cache_shards(ours, shards, tmp_path / "b", crop="random")  # another crop of the same encoder: fine
    cache_shards(other, shards, tmp_path / "c")
    cache_shards(ours, shards, tmp_path / "d", resolution=16)
    assert read_cache_info(f"{tmp_path / 'a'}::{tmp_path / 'b'}") == json.loads(
        (tmp_path / "a" / CACHE_INFO).read_text()
    )
    for folder, key in (("c", "encoder_sha256"), ("d", "resolution")):
        urls = f"{tmp_path / 'a'}::{tmp_path / folder}"
        cfg = compose_train("experiment=tiny", "data=latents", f"data.train_urls={urls}")
        with pytest.raises(
            ValueError, match=f"latents in {tmp_path / folder} were made with a different '{key}'"
        ):
            _adopt_autoencoder_config(cfg)


def _pool_moments(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    z = torch.load(f"{out}/z.pt", weights_only=True)  # rank 0 takes 3 images, rank 1 the other 5
    z = z[:3] if rank == 0 else z[3:]
    moments = LatentMoments(4)
    moments.update(z)
    stats = moments.stats()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(stats.as_dict(), f)
    dist.destroy_process_group()


def test_pooled_latent_stats_count_the_images_of_all_ranks(tmp_path):
    z = (
        torch.randn(8, 4, 3, 5, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1)
        + 0.7
    )
    torch.save(z, tmp_path / "z.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_pool_moments, args=(port, str(tmp_path)), nprocs=2)
    flat = z.flatten()
    two_pass_std = ((flat - flat.mean()).square().mean()).sqrt().item()  # float64, two passes
    for rank in (0, 1):
        stats = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert stats["num_samples"] == 8  # 3 + 5, not this rank's own
        assert stats["mean"] == pytest.approx(flat.mean().item(), rel=1e-12)
        assert stats["std"] == pytest.approx(two_pass_std, rel=1e-12)


def test_caching_refuses_a_rank_outside_the_world(shards, tmp_path):
    """rank 3 of 2 takes every other shard from the fourth: rank 1's, written by two processes into one .tmp."""
    ckpt, _ = _checkpoint(tmp_path / "vae.ckpt", seed=0)
    for rank in (-1, 2, 3):
        with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\)"):
            cache_shards(ckpt, shards, tmp_path / "cache", rank=rank, world_size=2)


def test_a_cached_shard_is_on_disk_before_it_gets_its_name(shards, tmp_path, monkeypatch):
    """A resumed job skips every shard that has its final name: the rename must follow an fsync of the data, or a
    power loss can leave an empty shard under that name, skipped for good (its samples missing from the cache)."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    ckpt, _ = _checkpoint(tmp_path / "vae.ckpt", seed=0)
    out = tmp_path / "cache"
    cache_shards(ckpt, shards, out)
    renames = [(i, e) for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith(".tar")]
    assert len(renames) == 2
    for i, (_, src, _) in renames:
        assert ("fsync", src) in events[:i]  # the data, before the rename
        assert ("fsync", str(out)) in events[i + 1 :]  # and the rename itself
