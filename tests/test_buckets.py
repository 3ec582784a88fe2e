"""Aspect-ratio buckets: the bucket sizes, the placement of an image, batches of one size from the stream, and
exact resume of a bucketed stream (samples waiting in partly filled queues are neither lost nor repeated)."""

import io
import math
import random
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.buckets import BucketSpec, BucketTransform, make_buckets, nearest_bucket
from ldm.data.loader import ResumableLoader
from ldm.data.webdataset import image_text_pipeline
from ldm.models import CrossAttentionUNet

from .helpers import write_mixed_shards

NUM_SHARDS, PER_SHARD = 8, 6
BASE, STEP = 16, 4  # buckets (h, w): (20, 12), (16, 16), (12, 20)
SPEC = {"step": STEP, "max_ratio": 2.0}
# stored (width, height) → weight: landscape common, portrait rare (its queue waits long, across rounds)
SIZES = {(32, 32): 3, (36, 30): 2, (40, 24): 3, (50, 20): 2, (24, 40): 1}


def _sizes_of_keys(n: int) -> dict[str, tuple[int, int]]:
    rng = random.Random(0)
    population = [s for s, w in SIZES.items() for _ in range(w)]
    return {f"{i:09d}": rng.choice(population) for i in range(n)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("bucket-shards")
    sizes = _sizes_of_keys(NUM_SHARDS * PER_SHARD)
    originals = write_mixed_shards(out, NUM_SHARDS, PER_SHARD, sizes)
    return str(out), sizes, originals


# ---------------------------------------------------------------- bucket sizes and placement


def test_sdxl_like_buckets_at_256():
    assert make_buckets(256, 64, 2.0) == [(320, 192), (256, 256), (192, 320)]
    assert make_buckets(BASE, STEP, 2.0) == [(20, 12), (16, 16), (12, 20)]


@pytest.mark.parametrize(
    "base,step,max_ratio", [(256, 64, 4.0), (256, 32, 2.0), (512, 64, 2.0), (1024, 64, 4.0)]
)
def test_buckets_have_about_the_base_area(base, step, max_ratio):
    buckets = make_buckets(base, step, max_ratio)
    area = base * base
    assert (base, base) in buckets and len(set(buckets)) == len(buckets)
    assert {(w, h) for h, w in buckets} == set(buckets)  # portrait and landscape alike
    for h, w in buckets:
        assert h % step == 0 and w % step == 0
        assert h * w <= area and max(h, w) / min(h, w) <= max_ratio
        # as large as the grid allows: one more step on one side would exceed base², so the area is within
        # one step times the long side of base²
        assert (h + step) * w > area or h * (w + step) > area
        assert h * w > area - step * max(h, w)
    ratios = [w / h for h, w in buckets]
    assert ratios == sorted(ratios)


def test_nearest_bucket_by_log_ratio():
    buckets = make_buckets(256, 64, 4.0)
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.randint(50, 4000), rng.randint(50, 4000)
        got = nearest_bucket(w, h, buckets)
        distances = sorted(abs(math.log(w / h) - math.log(bw / bh)) for bh, bw in buckets)
        assert abs(math.log(w / h) - math.log(got[1] / got[0])) == distances[0]
    assert nearest_bucket(300, 200, make_buckets(256, 64, 2.0)) == (192, 320)
    assert nearest_bucket(1000, 100, make_buckets(256, 64, 2.0)) == (192, 320)  # the widest there is


@pytest.mark.parametrize("crop", ["center", "random"])
def test_transform_covers_the_bucket_and_crops_minimally(crop):
    """The image is scaled to cover the bucket exactly on one side, and the crop shows what resizing the whole
    image and cutting the bucket out of it shows."""
    transform = BucketTransform(make_buckets(64, 16, 2.0), crop=crop)
    rng = random.Random(1)
    yy, xx = np.mgrid[0:90, 0:160]
    image = Image.fromarray(np.stack([xx * 255 // 159, yy * 255 // 89, (xx + yy) % 256], -1).astype(np.uint8))
    out = transform(image, rng)
    placed = transform.last
    bh, bw = placed.bucket
    assert placed.bucket == nearest_bucket(160, 90, transform.buckets) == (48, 80)
    assert out.shape == (3, bh, bw)
    rh, rw = placed.resized
    assert (rh == bh) or (rw == bw)  # covering, not more
    top, left = placed.crop
    assert 0 <= top <= rh - bh and 0 <= left <= rw - bw
    if crop == "center":
        assert (top, left) == ((rh - bh) // 2, (rw - bw) // 2)
    reference = np.asarray(image.resize((rw, rh), Image.Resampling.BICUBIC))[top : top + bh, left : left + bw]
    got = ((out.permute(1, 2, 0) + 1) * 127.5).round().numpy()
    assert np.abs(got - reference).mean() < 3.0


def test_dct_scaled_decode_keeps_the_source_size_and_the_crop():
    """A large JPEG decoded at 1/2, 1/4 or 1/8 scale: the micro-conditioning sees its full size, and the bucket
    crop is the full decode's (same seed), up to the reduced decode's blur."""
    from skimage import data as skdata

    from ldm.data.transforms import decode_image

    photo = Image.fromarray(skdata.astronaut()).resize((1210, 830), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=92)
    transform = BucketTransform(make_buckets(128, 32, 2.0), crop="random")
    reduced = decode_image(buffer.getvalue(), min_size=transform.resolution)
    assert reduced.width < 1210  # DCT-scaled
    fast = transform(reduced, random.Random(5))
    assert transform.last.size == (830, 1210)
    placed_fast = transform.last
    full = transform(decode_image(buffer.getvalue()), random.Random(5))
    assert transform.last == placed_fast and fast.shape == full.shape
    mse = ((fast - full) / 2).pow(2).mean().item()
    assert 10 * math.log10(1 / mse) > 30


def test_hflip_mirrors_the_crop_offset():
    transform = BucketTransform([(16, 16)], crop="center", hflip_prob=1.0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 40, 3), dtype=np.uint8))
    plain = BucketTransform([(16, 16)], crop="center")
    torch.testing.assert_close(transform(image, random.Random(0)), plain(image, random.Random(0)).flip(-1))
    assert transform.last.crop == (0, 40 - 16 - plain.last.crop[1])


# ---------------------------------------------------------------- the stream


def _loader(urls, num_workers, resampled, partial=False, batch_size=4, round_shards=2):
    stream = image_text_pipeline(
        urls,
        BASE,
        batch_size,
        crop="random",
        hflip_prob=0.5,
        shuffle_buffer=10,
        resampled=resampled,
        round_shards=round_shards,
        partial_batches=partial,
        buckets=SPEC,
    )
    return ResumableLoader(stream, num_workers=num_workers)


def _epochs(loader, max_epochs: int = 6):
    for _ in range(max_epochs):
        for batch in loader:
            loader.mark_consumed(batch)
            yield batch


def test_batches_are_of_one_bucket_with_micro_conditioning(shards, monkeypatch):
    urls, sizes, originals = shards
    monkeypatch.setenv("WORLD_SIZE", "1")
    buckets = make_buckets(BASE, STEP, 2.0)
    batches = list(_epochs(_loader(urls, 0, resampled=False, partial=True), max_epochs=1))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(sizes)  # partial batches: every sample once
    seen = set()
    for batch in batches:
        h, w = batch["image"].shape[-2:]
        seen.add((h, w))
        assert len(batch["key"]) <= 4
        for i, key in enumerate(batch["key"]):
            assert (h, w) == nearest_bucket(*sizes[key], buckets)
            assert batch["target_size"][i].tolist() == [h, w]
            assert tuple(batch["original_size"][i].tolist()) == originals[key]
            top, left = batch["crop_coords"][i].tolist()
            sw, sh = sizes[key]
            scale = max(h / sh, w / sw)
            assert 0 <= top <= max(h, round(sh * scale)) - h and 0 <= left <= max(w, round(sw * scale)) - w
    assert seen == set(buckets)
    full = [b for b in batches if len(b["key"]) == 4]
    assert len(batches) - len(full) <= len(buckets)  # only the last batch of each bucket is short


def test_without_partial_batches_only_the_leftovers_are_dropped(shards, monkeypatch):
    urls, sizes, _ = shards
    monkeypatch.setenv("WORLD_SIZE", "1")
    batches = list(_epochs(_loader(urls, 0, resampled=False), max_epochs=1))
    assert all(len(b["key"]) == 4 for b in batches)
    counts: dict = {}
    for size in sizes.values():
        bucket = nearest_bucket(*size, make_buckets(BASE, STEP, 2.0))
        counts[bucket] = counts.get(bucket, 0) + 1
    assert len(batches) == sum(n // 4 for n in counts.values())


def _same(a, b):
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"])  # same buckets, crops and flips
        assert torch.equal(x["crop_coords"], y["crop_coords"])


@pytest.mark.parametrize(
    "num_workers,resampled,stops",
    [
        (0, False, (1, 2, 3, 5, 7, 9)),  # mid-epoch and at its end (9 full batches per epoch)
        (0, True, (2, 6, 11, 15)),
        (2, True, (7,)),  # the next batch due from worker 1
    ],
)
def test_resumed_bucketed_loader_continues_with_the_next_batches(
    shards, num_workers, resampled, stops, monkeypatch
):
    urls = shards[0]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    total = 20
    expected = list(islice(_epochs(_loader(urls, num_workers, resampled, round_shards=1)), total))
    assert len(expected) == total
    older_rounds = 0
    for stop in stops:
        first = _loader(urls, num_workers, resampled, round_shards=1)
        before = list(islice(_epochs(first), stop))
        state = first.state_dict()
        (mine,) = state["ranks"]
        for worker, pending in mine["pending"].items():
            rnd = mine["positions"][worker][0]
            older_rounds += sum(r < rnd for r, _ in pending)
        resumed = _loader(urls, num_workers, resampled, round_shards=1)
        resumed.load_state_dict(state)
        after = list(islice(_epochs(resumed), total - stop))
        _same(before + after, expected)
    if resampled and num_workers == 0:
        assert older_rounds > 0  # some resume had samples waiting from an earlier round to re-read


def test_one_bucketed_epoch_over_ranks_and_workers_sees_every_sample_once(shards, monkeypatch):
    """2 ranks × 2 workers, partial batches, interrupted mid-epoch on each rank: each sample exactly once."""
    urls, sizes, _ = shards
    keys = []
    for rank, stop in ((0, 2), (1, 3)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        first = _loader(urls, 2, resampled=False, partial=True)
        for batch in islice(iter(first), stop):
            first.mark_consumed(batch)
            keys += batch["key"]
        assert any(first.state_dict()["ranks"][0]["pending"].values())  # samples were waiting
        resumed = _loader(urls, 2, resampled=False, partial=True)
        resumed.load_state_dict(first.state_dict())
        keys += [k for batch in resumed for k in batch["key"]]
    assert sorted(keys) == sorted(sizes)


def test_datamodule_and_config_take_buckets(shards):
    from hydra.utils import instantiate

    from .helpers import compose_train

    urls = shards[0]
    cfg = compose_train("experiment=tiny", f"data.train_urls={urls}", "data.buckets={step: 8, max_ratio: 2}")
    assert cfg.data.buckets.step == 8
    data = instantiate(cfg.data, num_workers=0, batch_size=2, resolution=BASE)
    batch = next(iter(data.train_dataloader()))
    assert tuple(batch["image"].shape[-2:]) in make_buckets(BASE, 8, 2.0)
    assert compose_train("experiment=tiny").data.buckets is None  # square crops by default
    with pytest.raises(ValueError, match="unknown keys"):
        BucketSpec.of({"stepp": 8})


# ---------------------------------------------------------------- the UNet on non-square latents


def test_unet_on_bucket_sized_latents():
    """A 16×24 latent (a 128×192 image at f8) through a UNet with two downsamplings: shape kept, and each sample
    the same alone as in its batch."""
    torch.manual_seed(0)
    unet = CrossAttentionUNet(
        model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2,), head_dim=16, context_dim=16
    ).eval()
    for p in unet.parameters():  # the output layers are zero at init: perturb them all
        p.data.add_(torch.randn_like(p) * 0.02)
    x, context = torch.randn(2, 4, 16, 24), torch.randn(2, 5, 16)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        out = unet(x, t, context)
        alone = unet(x[1:], t[1:], context[1:])
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out[1:], alone, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        unet(torch.randn(1, 4, 16, 22), t[:1], context[:1])


def test_micro_conditioning_starts_neutral_and_then_matters():
    from ldm.models.unet import default_micro_conditioning, micro_conditioning

    torch.manual_seed(0)
    kwargs = dict(
        model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), head_dim=16, context_dim=16
    )
    plain = CrossAttentionUNet(**kwargs).eval()
    micro_unet = CrossAttentionUNet(**kwargs, micro_conditioning=True).eval()
    missing, unexpected = micro_unet.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["micro_proj.weight", "micro_proj.bias"] and not unexpected
    for p in micro_unet.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    plain.load_state_dict({k: v for k, v in micro_unet.state_dict().items() if not k.startswith("micro")})
    x, t, context = torch.randn(2, 4, 8, 12), torch.tensor([5, 500]), torch.randn(2, 3, 16)
    original = torch.tensor([[512, 768], [64, 96]])
    micro = micro_conditioning(original, torch.tensor([[0, 0], [10, 20]]), torch.tensor([[64, 96], [64, 96]]))
    assert micro.shape == (2, 6) and micro[1].tolist() == [64, 96, 10, 20, 64, 96]
    default = default_micro_conditioning(2, 64, 96)
    assert default.tolist() == [[64, 96, 0, 0, 64, 96]] * 2
    with torch.no_grad():
        a, b = micro_unet(x, t, context, micro=micro), micro_unet(x, t, context, micro=default)
        micro_unet.micro_proj.weight.zero_()
        micro_unet.micro_proj.bias.zero_()
        neutral = micro_unet(x, t, context, micro=micro)
        reference = plain(x, t, context)
    assert not torch.allclose(a, b, atol=1e-4)  # the sizes matter
    torch.testing.assert_close(neutral, reference)  # zero projection: the plain UNet
    with pytest.raises(ValueError, match="needs `micro`"):
        micro_unet(x, t, context)
