"""Reference statistics of real images for FID/KID: computed once from a shard set, cached on disk, reused.

The reference set is the first `num_images` samples of the shards *in order* (no shuffling: the same images
whatever the number of processes), centre-cropped and resized to the evaluation resolution (PIL bicubic, as the
training data pipeline does), quantized to 8 bits, then fed to the feature extractor (Inception; DINOv2 for
FD_DINOv2) with the run's resize protocol.

A cache file holds `mu`, `sigma` (float64, as pytorch-fid / clean-fid `.npz` files do), the float32 features
(KID and precision / recall need samples, not moments) and a JSON `info` record. Its name is a hash of everything that changes the
numbers: shard URLs (and, for local shards, their sizes and modification times: shards rewritten in place are another
reference set), resolution, crop, decode, resize protocol, image count and the feature extractor's weights.

Images are decoded in full before the resize: libjpeg's reduced decode (`decode_image(min_size=)`, which training
uses for speed) is a different filter and moves pixels of large photos by up to ~20 levels.

An existing `.npz` with `mu` and `sigma` (e.g. published statistics) can also be passed instead of shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from eval.distributed import DistContext, IndexedFeatures, barrier, is_distributed
from eval.features import split_output
from ldm.data.latents import read_cache_info
from ldm.data.transforms import ImageTransform, SampleError, decode_image
from ldm.data.webdataset import IMAGE_KEYS, SkipCounter, TarSamples, expand_urls

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "ldm", "fid_reference")


@dataclass
class ReferenceStats:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64, unbiased (n - 1)
    num_images: int
    features: np.ndarray | None = None  # (N, D) float32; None for moments-only files (no KID then)
    info: dict = field(default_factory=dict)

    def fid_states(self) -> tuple[Tensor, Tensor, Tensor]:
        """(Σf, Σf fᵀ, n) in float64: the "real" states of torchmetrics' FrechetInceptionDistance."""
        n = self.num_images
        if self.features is not None:
            f = torch.from_numpy(self.features).double()
            return f.sum(0), f.T @ f, torch.tensor(n)
        mu, sigma = torch.from_numpy(self.mu), torch.from_numpy(self.sigma)
        return mu * n, sigma * (n - 1) + n * torch.outer(mu, mu), torch.tensor(n)


def moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance in float64."""
    f = features.astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def save_reference(stats: ReferenceStats, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file, then rename): concurrent jobs never read half a file."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "num_images": np.array(stats.num_images)}
    if stats.features is not None:
        arrays["features"] = stats.features
    np.savez(tmp, info=np.array(json.dumps(stats.info, sort_keys=True)), **arrays)
    os.replace(tmp, path)
    return path


def load_reference(path: str | os.PathLike) -> ReferenceStats:
    """A cache file of ours, or any `.npz` with `mu` and `sigma` (pytorch-fid / clean-fid layout)."""
    with np.load(Path(path).expanduser(), allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path}: a reference .npz needs 'mu' and 'sigma' arrays, found {list(data)}")
        features = data.get("features")
        if "num_images" in data:
            n = int(data["num_images"])
        elif features is not None:
            n = len(features)
        else:
            raise ValueError(f"{path}: has no 'num_images' (needed to use the moments in FID's float64 sums)")
        info = json.loads(str(data["info"])) if "info" in data else {"source": str(path)}
        return ReferenceStats(
            data["mu"].astype(np.float64), data["sigma"].astype(np.float64), n, features, info
        )


def reference_key(
    urls: Sequence[str], resolution: int, num_images: int, extractor: dict, crop: str = "center"
) -> str:
    """Hash of everything that changes the statistics."""
    spec = {
        "urls": list(urls),
        "files": [_file_signature(u) for u in urls],
        "resolution": resolution,
        "crop": crop,
        "decode": "full",
        "num_images": num_images,
        "resize": extractor["resize"],
        "weights_sha256": extractor["weights_sha256"],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _file_signature(url: str) -> list[int] | None:
    """(size, modification time in ns) of a local shard; None for a remote one (its URL alone keys it)."""
    path = Path(url.removeprefix("file:")).expanduser()
    if not path.is_file():
        return None
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def reference_images(
    urls: Sequence[str], resolution: int, num_images: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[int, Tensor]]:
    """(index, uint8 (3, R, R)) for the first `num_images` samples of `urls` in order; this process decodes only
    those with index ≡ rank (mod world_size). A sample that does not decode is skipped (and logged), not replaced,
    so the set is the same for every number of processes."""
    counter = SkipCounter(log_every=100)
    transform = ImageTransform(resolution, crop="center")
    index = 0
    for sample in TarSamples(counter)({"url": u} for u in urls):
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            continue  # not an image sample (a stray member): does not count
        if index % world_size == rank:
            try:
                image = decode_image(sample[image_key])  # in full: a reduced JPEG decode is another filter
                x = transform(image)  # (3, R, R) in [-1, 1], exactly 8-bit levels
                yield index, ((x + 1) * 127.5).round().to(torch.uint8)
            except Exception as exn:  # an undecodable image is skipped and counted, as in training
                reason = exn.reason if isinstance(exn, SampleError) else "decode_error"
                counter.skip(reason, exn, f"{sample['__url__']}:{sample['__key__']}")
        index += 1
        if index >= num_images:
            return


@torch.no_grad()
def compute_reference(
    urls: str | Sequence[str],
    resolution: int,
    num_images: int,
    extractor: nn.Module,
    batch_size: int = 64,
    ctx: DistContext | None = None,
) -> ReferenceStats:
    """Statistics of the reference images in the extractor's feature space (Inception pool3, DINOv2); with several
    processes each does its share and all get all."""
    ctx = ctx or DistContext()
    shard_urls = expand_urls(urls)
    gathered = IndexedFeatures().to(extractor.device)
    batch: list[tuple[int, Tensor]] = []
    for item in reference_images(shard_urls, resolution, num_images, ctx.rank, ctx.world_size):
        batch.append(item)
        if len(batch) == batch_size:
            _add(gathered, extractor, batch)
            batch = []
    if batch:
        _add(gathered, extractor, batch)
    index, pool, _ = gathered.compute()
    if len(index) < 2:
        raise ValueError(f"the reference shards {urls!r} gave {len(index)} images; FID needs at least 2")
    features = pool.cpu().numpy().astype(np.float32)
    mu, sigma = moments(features)
    info = {
        "urls": shard_urls,
        "resolution": resolution,
        "crop": "center",
        "decode": "full",
        "requested_images": num_images,
        "num_images": len(features),
        "feature_extractor": extractor.identity(),
    }
    return ReferenceStats(mu, sigma, len(features), features, info)


def _add(gathered: IndexedFeatures, extractor: nn.Module, batch: list[tuple[int, Tensor]]) -> None:
    index = torch.tensor([i for i, _ in batch])
    out = extractor(torch.stack([x for _, x in batch]))
    gathered.update(index, split_output(out)[0])  # the reference needs features only


def image_shards_of(urls: str | Sequence[str]) -> str | Sequence[str]:
    """`urls`, or, for cached-latent shards (which hold no images; `data=latents` runs point `reference` at them by
    default), the image shards their `cache_info.json` says they were made from."""
    info = read_cache_info(urls)
    if info is None or not info.get("source_urls"):
        return urls
    log.info(
        "%s holds cached latents: the reference images are those it was made from, %s",
        urls,
        info["source_urls"],
    )
    return info["source_urls"]


def reference_stats(
    source: str | Sequence[str],
    resolution: int,
    num_images: int,
    extractor: nn.Module,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    ctx: DistContext | None = None,
) -> ReferenceStats:
    """Statistics from a `.npz` file, or from shards through the cache (computed on a miss by all processes,
    written by rank 0). Every process must call it. Cached-latent shards stand for the image shards they were made
    from (`image_shards_of`)."""
    ctx = ctx or DistContext()
    if isinstance(source, str | os.PathLike) and str(source).endswith(".npz"):
        return load_reference(source)
    shard_urls = expand_urls(image_shards_of(source))
    key = reference_key(shard_urls, resolution, num_images, extractor.identity())
    if is_distributed():  # rank 0's key: node-local copies of the shards can have other modification times
        shared = [key]
        torch.distributed.broadcast_object_list(shared, src=0)
        key = shared[0]
    path = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / f"fid_reference_{key}.npz"
    if path.is_file():
        stats = load_reference(path)
        stats.info["cache_file"] = str(path)
        return stats
    log.info("reference statistics not cached: computing them (%d images) into %s", num_images, path)
    stats = compute_reference(shard_urls, resolution, num_images, extractor, batch_size, ctx)
    stats.info["key"] = key
    if ctx.is_main:
        save_reference(stats, path)
    barrier()  # the file exists for every process once this returns
    stats.info["cache_file"] = str(path)
    return stats
