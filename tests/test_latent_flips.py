"""Flips on cached latents: a cache written with flips=true holds the latents of both orientations of each crop,
and the latent stream takes the mirrored one with probability data.hflip_prob, as the image stream mirrors pixels."""

import json
import random
from collections import Counter

import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException

from ldm.data.buckets import BucketDecoder, BucketTransform
from ldm.data.latents import CACHE_INFO, DecodeLatents, latent_pipeline
from ldm.data.transforms import ImageTransform, SampleError
from ldm.data.webdataset import ImageDecoder
from ldm.inference import load_autoencoder
from ldm.training.run import train

from .helpers import compose_train
from .latent_helpers import (
    BUCKETS,
    cache_members,
    cache_shards,
    latent_run,
    tar_members,
)


def _raw_samples(shards) -> dict[str, dict]:
    """key → the image shard's raw sample (image bytes and json), as the cache writer reads it."""
    out: dict[str, dict] = {}
    for path in sorted(shards.glob("*.tar")):
        for ext in ("jpg", "png", "json", "txt"):
            for key, data in tar_members(path, ext):
                out.setdefault(key, {"__key__": key})[ext] = data
    return out


@pytest.fixture(scope="module")
def caches(mixed_shards, ae_ckpt, tmp_path_factory):
    """Square and bucketed caches of the mixed-size images, random crops, with and without flips."""
    root, shards = tmp_path_factory.mktemp("flip-caches"), mixed_shards[0]
    out = {}
    for name, buckets in (("square", None), ("bucketed", BUCKETS)):
        for flips in (False, True):
            folder = root / f"{name}-{'flips' if flips else 'plain'}"
            cache_shards(ae_ckpt, shards, folder, crop="random", buckets=buckets, batch_size=4, flips=flips)
            out[name, flips] = folder
    return out


@pytest.mark.parametrize("layout", ["square", "bucketed"])
def test_a_flipped_cache_holds_the_latents_of_the_mirrored_crops(layout, caches, mixed_shards, ae_ckpt):
    plain, flipped = cache_members(caches[layout, False]), cache_members(caches[layout, True])
    assert sorted(plain) == sorted(flipped) and len(plain) == 30
    assert json.loads((caches[layout, True] / CACHE_INFO).read_text())["flips"] is True

    # the mirrored image as the image stream makes it (its own flip path: PIL/torch resize_crop), with the crop
    # the cache drew for that key
    ae, _ = load_autoencoder(ae_ckpt)
    transform = (
        ImageTransform(32, crop="random", hflip_prob=1.0)
        if layout == "square"
        else BucketTransform.from_spec(BUCKETS, 32, crop="random", hflip_prob=1.0)
    )
    decode = ImageDecoder(transform) if layout == "square" else BucketDecoder(ImageDecoder(transform))
    raw = _raw_samples(mixed_shards[0])
    not_equivariant = 0
    for key, member in flipped.items():
        # the unflipped half is the plain cache's
        torch.testing.assert_close(member["latent_mean"], plain[key]["latent_mean"], atol=0, rtol=0)
        mirror = decode(raw[key], random.Random(f"cache/{key}"))
        posterior = ae.encode(mirror["image"][None])
        torch.testing.assert_close(member["latent_mean_flip"], posterior.mean[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(member["latent_std_flip"], posterior.std[0], atol=2e-3, rtol=2e-3)
        if layout == "bucketed":
            assert torch.equal(member["crop_coords_flip"], mirror["crop_coords"])
            assert torch.equal(member["crop_coords"], plain[key]["crop_coords"])
            for name in ("original_size", "target_size"):
                assert torch.equal(member[name], mirror[name])
        else:
            assert "crop_coords_flip" not in member
        gap = (member["latent_mean_flip"] - member["latent_mean"].flip(-1)).abs().max()
        not_equivariant += bool(gap > 1e-2)
    # why both are stored: mirroring the latent is not encoding the mirrored image
    assert not_equivariant == len(flipped)
    if layout == "bucketed":  # some crops sit off-centre, so their mirrored coordinates differ
        assert any(not torch.equal(m["crop_coords_flip"], m["crop_coords"]) for m in flipped.values())


def _orientations(folder, hflip_prob: float, seed: int) -> dict[str, bool]:
    """key → whether one pass of the stream gave the mirrored latents, checked against the stored ones (and the
    crop coordinates that go with them)."""
    stored = cache_members(folder)
    seen = {}
    stream = latent_pipeline(
        str(folder),
        4,
        shuffle_buffer=0,
        resampled=False,
        partial_batches=True,
        seed=seed,
        hflip_prob=hflip_prob,
    )
    for batch in stream:
        assert not any(name.endswith("_flip") for name in batch)
        for i, key in enumerate(batch["key"]):
            ours, theirs = stored[key]["latent_mean"], stored[key]["latent_mean_flip"]
            mirrored = torch.equal(batch["latent_mean"][i], theirs)
            assert mirrored or torch.equal(batch["latent_mean"][i], ours)
            std = stored[key]["latent_std_flip" if mirrored else "latent_std"]
            assert torch.equal(batch["latent_std"][i], std)
            if "crop_coords" in batch:
                crop = stored[key]["crop_coords_flip" if mirrored else "crop_coords"]
                assert torch.equal(batch["crop_coords"][i], crop)
            seen[key] = mirrored
    assert len(seen) == 30
    return seen


def test_the_latent_stream_flips_with_hflip_prob_and_its_draws_are_reproducible(caches):
    folder = caches["bucketed", True]
    assert not any(_orientations(folder, 0.0, seed=0).values())
    assert all(_orientations(folder, 1.0, seed=0).values())
    draws = Counter()
    for seed in range(10):
        once = _orientations(folder, 0.5, seed)
        assert once == _orientations(
            folder, 0.5, seed
        )  # drawn from the sample's own generator: a resume agrees
        draws.update(once.values())
    assert abs(draws[True] - 150) < 4 * (300 * 0.25) ** 0.5  # 300 draws at p = 0.5, 4 sigma
    square = Counter(
        v for seed in range(10) for v in _orientations(caches["square", True], 0.25, seed).values()
    )
    assert abs(square[True] - 75) < 4 * (300 * 0.25 * 0.75) ** 0.5


class _Latents(L.Callback):
    def __init__(self):
        self.seen: list[tuple[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += [(k, batch["latent_mean"][i].cpu()) for i, k in enumerate(batch["key"])]


def test_stage2_trains_on_both_orientations_of_a_flipped_cache(caches, tmp_path):
    folder = caches["bucketed", True]
    stored, seen = cache_members(folder), _Latents()
    run = [*latent_run(folder, 3, 8), "unet.micro_conditioning=true", "data.hflip_prob=0.5"]
    result = train(compose_train(*run, run_dir=str(tmp_path / "run")), extra_callbacks=[seen])
    assert result["global_step"] == 8 and len(seen.seen) == 24
    mirrored = []
    for key, latent in seen.seen:
        flip = torch.equal(latent, stored[key]["latent_mean_flip"])
        assert flip or torch.equal(latent, stored[key]["latent_mean"])
        mirrored.append(flip)
    assert 0 < sum(mirrored) < len(mirrored)  # P(all 24 one way) = 2^-23


def test_flips_need_a_cache_written_with_them(caches, mixed_shards, ae_ckpt, tmp_path):
    plain = caches["square", False]
    raw = next(iter(_raw_latent_samples(plain).values()))
    with pytest.raises(SampleError, match="flips=true") as exn:
        DecodeLatents.decode(raw, random.Random(0), hflip_prob=0.5)
    assert exn.value.reason == "decode_error"
    assert "latent_mean_flip" not in DecodeLatents.decode(_first(caches["square", True]), random.Random(0))

    cfg = compose_train(*latent_run(plain, 4, 2), "data.hflip_prob=0.5", run_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"cached without their mirror images.*flips=true"):
        train(cfg)
    with pytest.raises(InstantiationException, match=r"hflip_prob must be in \[0, 1\], got 1.5"):
        train(compose_train(*latent_run(caches["square", True], 4, 2), "data.hflip_prob=1.5"))

    # a cache is one kind or the other: adding flipped shards to a plain cache is refused, and a cache_info.json
    # written before flips existed counts as plain
    out = tmp_path / "cache"
    cache_shards(ae_ckpt, mixed_shards[0], out)
    with pytest.raises(ValueError, match="different 'flips'"):
        cache_shards(ae_ckpt, mixed_shards[0], out, flips=True)
    legacy = json.loads((out / CACHE_INFO).read_text())
    del legacy["flips"]
    (out / CACHE_INFO).write_text(json.dumps(legacy))
    assert cache_shards(ae_ckpt, mixed_shards[0], out).shards_skipped == 3
    with pytest.raises(ValueError, match="different 'flips'"):
        cache_shards(ae_ckpt, mixed_shards[0], out, flips=True)


def _raw_latent_samples(folder) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in sorted(folder.glob("*.tar")):
        for ext in ("latents.safetensors", "json", "txt"):
            for key, data in tar_members(path, ext):
                out.setdefault(key, {"__key__": key})[ext] = data
    return out


def _first(folder) -> dict:
    return next(iter(_raw_latent_samples(folder).values()))
