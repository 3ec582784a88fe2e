"""Review of the evaluation data flow: how real images reach the feature extractor, and when the cached reference
statistics are reused. Checked against independent computations (PIL, plain numpy), with a tiny stand-in
feature extractor where the network does not matter."""

import io

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import nn

from eval.reference import compute_reference, reference_images, reference_stats


def _photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]


def _write_jpeg_shard(path, photos: list[np.ndarray], scale: int = 1) -> list[bytes]:
    encoded = []
    with wds.TarWriter(str(path)) as sink:
        for i, photo in enumerate(photos):
            image = Image.fromarray(photo)
            image = image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=95)
            encoded.append(buf.getvalue())
            sink.write({"__key__": f"{i:04d}", "jpg": buf.getvalue(), "txt": f"photo {i}"})
    return encoded


def _pil_reference(jpeg: bytes, resolution: int) -> np.ndarray:
    """The documented protocol, written with PIL alone: full decode, shorter side → resolution (bicubic), centre
    crop (clean-fid / the SD COCO evaluation)."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    scale = resolution / min(image.size)
    w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    left, top = (w - resolution) // 2, (h - resolution) // 2
    resized = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC))
    return resized[top : top + resolution, left : left + resolution]


def test_reference_images_are_pil_bicubic_of_the_full_decode(tmp_path):
    """Photos much larger than the resolution: the reference images are those of a full decode resized with PIL
    bicubic (within a grey level: torch's uint8 kernel), not of libjpeg's reduced (DCT-scaled) decode, which moves
    pixels by up to ~20 levels and is not what generated images are compared against in published protocols."""
    encoded = _write_jpeg_shard(tmp_path / "photos-000000.tar", _photos(), scale=2)
    urls = [str(tmp_path / "photos-000000.tar")]
    for resolution in (64, 256):
        ours = dict(reference_images(urls, resolution, num_images=len(encoded)))
        assert sorted(ours) == list(range(len(encoded)))
        for i, jpeg in enumerate(encoded):
            expected = _pil_reference(jpeg, resolution).astype(np.int16)
            got = ours[i].permute(1, 2, 0).numpy().astype(np.int16)
            diff = np.abs(got - expected)
            assert diff.max() <= 1 and diff.mean() < 0.01, (resolution, i, diff.max(), diff.mean())


class _ChannelMeans(nn.Module):
    """Stand-in feature extractor: per-channel means and standard deviations of the uint8 image (6 features)."""

    dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def identity(self) -> dict:
        return {"resize": "none", "weights_sha256": "0" * 64}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().flatten(2)
        return torch.cat([x.mean(-1), x.std(-1)], 1)


def test_reference_cache_is_not_reused_when_the_shards_change(tmp_path):
    """Shards rewritten at the same path (another COCO subset, another seed) are another reference set: the cache
    must not hand back the old statistics."""
    shard = tmp_path / "ref" / "ref-000000.tar"
    shard.parent.mkdir()
    photos = _photos()
    extractor = _ChannelMeans()
    _write_jpeg_shard(shard, photos)
    first = reference_stats(str(shard), 32, 4, extractor, cache_dir=tmp_path / "cache")
    _write_jpeg_shard(
        shard, [np.ascontiguousarray(p[::-1, ::-1]) // 2 for p in photos]
    )  # same path, other images
    again = reference_stats(str(shard), 32, 4, extractor, cache_dir=tmp_path / "cache")
    expected = compute_reference(str(shard), 32, 4, extractor)  # no cache: the statistics of the new images
    assert not np.allclose(first.mu, expected.mu)
    np.testing.assert_array_equal(again.features, expected.features)
    np.testing.assert_array_equal(again.mu, expected.mu)
    # unchanged shards still hit the cache
    assert (
        reference_stats(str(shard), 32, 4, extractor, cache_dir=tmp_path / "cache").info["cache_file"]
        == (again.info["cache_file"])
    )


def _two_rank_worker(rank: int, shard: str, cache: str, init: str, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    import eval.reference as reference
    from eval.distributed import DistContext

    # each node sees its own copy of the shards: other modification times than rank 0's
    reference._file_signature = lambda url: [rank]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        ctx = DistContext(rank, 2)
        first = reference_stats(shard, 32, 4, _ChannelMeans(), cache, ctx=ctx)
        again = reference_stats(shard, 32, 4, _ChannelMeans(), cache, ctx=ctx)  # rank 0 hits the cache
        np.savez(
            f"{out}/rank{rank}.npz",
            first=first.features,
            again=again.features,
            cache=again.info["cache_file"],
        )
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_reference_cache_file(tmp_path):
    """Every rank must take the same cache decision (a miss is a collective computation): they use rank 0's key,
    also when their copies of the shards differ in modification time."""
    import torch.multiprocessing as mp

    shard = tmp_path / "ref-000000.tar"
    _write_jpeg_shard(shard, _photos())
    out = tmp_path / "out"
    out.mkdir()
    args = (str(shard), str(tmp_path / "cache"), f"file://{tmp_path / 'init'}", str(out))
    mp.start_processes(_two_rank_worker, args=args, nprocs=2, start_method="spawn")
    ranks = [np.load(out / f"rank{r}.npz") for r in range(2)]
    expected = compute_reference(str(shard), 32, 4, _ChannelMeans()).features
    for r in ranks:
        np.testing.assert_array_equal(r["first"], expected)
        np.testing.assert_array_equal(r["again"], expected)
    assert str(ranks[0]["cache"]) == str(ranks[1]["cache"])
    assert len(list((tmp_path / "cache").glob("fid_reference_*.npz"))) == 1
