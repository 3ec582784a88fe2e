"""The cache of latents (and text encodings) stage 2 can train on.

`cache_latents` encodes image shards once into cached-latent shards (`ldm.data.latents` has the format), shard by
shard, so a killed job resumes where it stopped and several processes split the shards between them. The latent
statistics that set the scale live in `ldm.latent_stats`.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import webdataset as wds

from ldm.conditioning import FrozenOpenCLIPTextEncoder
from ldm.data.buckets import MICRO_KEYS, BucketDecoder, BucketSpec, BucketTransform
from ldm.data.filters import SampleFilter
from ldm.data.latents import (
    CACHE_INFO,
    LATENTS_MEMBER,
    encode_latents_member,
    encoder_digest,
    write_cache_info,
)
from ldm.data.transforms import ImageTransform, SampleError, decode_caption
from ldm.data.webdataset import ImageDecoder, SkipCounter, TarSamples, expand_urls
from ldm.utils.checkpoint import publish


def cache_info(
    autoencoder_ckpt: str | os.PathLike,
    bundle: dict,
    resolution: int,
    crop: str,
    text_encoder: FrozenOpenCLIPTextEncoder | None,
    urls: str | Sequence[str],
    autoencoder: torch.nn.Module,
) -> dict:
    """What a cache was made from; training compares the autoencoder (architecture and encoder weights) and text
    encoder with its own. `autoencoder` is the one loaded from `autoencoder_ckpt`.
    The image settings (resolution, crop, buckets) are entered by `cache_latents` as it applies them."""
    text = None
    if text_encoder is not None:
        text = text_encoder.identity()
        if text["weights_in_checkpoint"]:
            raise ValueError(
                "caching text encodings needs a pretrained text encoder: a randomly initialised one is drawn anew "
                "by every run, so its cached encodings would not match the model that samples (cache latents only)"
            )
    return {
        "format_version": 1,
        "autoencoder_checkpoint": str(Path(autoencoder_ckpt).resolve()),
        "autoencoder": bundle["config"]["autoencoder"],
        "encoder_sha256": encoder_digest(autoencoder.state_dict()),
        "resolution": int(resolution),
        "crop": crop,
        "buckets": None,
        "text_encoder": text,
        "source_urls": urls if isinstance(urls, str) else list(urls),
    }


def _buckets_info(buckets: BucketSpec | Mapping | None, resolution: int) -> dict | None:
    spec = BucketSpec.of(buckets)
    if spec is None:
        return None
    return {**asdict(spec), "sizes": [list(hw) for hw in spec.sizes(resolution)]}


def cached_bucket_sizes(info: Mapping | None) -> list[tuple[int, int]] | None:
    """The image sizes (h, w) of a bucketed cache's `cache_info.json`; None for a square cache (or no info)."""
    buckets = (info or {}).get("buckets")
    return None if buckets is None else [(int(h), int(w)) for h, w in buckets["sizes"]]


def shard_name(url: str) -> str:
    """The file name a cached shard gets: the input shard's (`.../laion-00042.tar` → `laion-00042.tar`), also for
    `pipe:` commands (the last `*.tar` token of the command)."""
    names = re.findall(r"([^/\s'\"]+\.tar)\b", url)
    if not names:
        raise ValueError(f"cannot tell the shard's file name from {url!r} (no '*.tar' in it)")
    return names[-1]


class _ShardBatches(torch.utils.data.IterableDataset):
    """Whole shards, decoded and cropped, in batches of one image size; each DataLoader worker takes its own shards.

    Yields {"url", "image" (B, 3, h, w), "key", "txt", "json", ["original_size", "crop_coords", "target_size"],
    ["crop_coords_flip"], "last", "skipped"}. With buckets, a shard's images wait in a queue per size and a queue is encoded when full;
    what is left is flushed at the shard's end. The queues hold at most `max_queued` images in all (2 batches;
    beyond, the fullest is encoded at once): many buckets of large images (1024 px: 12.6 MB each in float32, ~30
    buckets) would otherwise hold gigabytes per worker. The final batch of a shard, empty, has "last" set and
    carries the shard's skip counts. A sample's crop depends on its key only (`random.Random("cache/<key>")`), so
    a cache written again, or by another number of processes, holds the same crops.
    """

    def __init__(self, urls: Sequence[str], decode: Callable[[dict, random.Random], dict], batch_size: int):
        super().__init__()
        self.urls, self.decode, self.batch_size = list(urls), decode, batch_size
        self.max_queued = 2 * batch_size

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        for url in self.urls[wid::nworkers]:
            counter = SkipCounter()
            queues: dict[tuple, list[dict]] = {}
            for raw in TarSamples(counter)([{"url": url}]):
                sample = self._decode(raw, counter)
                if sample is None:
                    continue
                size = tuple(sample["image"].shape)
                queues.setdefault(size, []).append(sample)
                if len(queues[size]) == self.batch_size:
                    yield self._collate(url, queues.pop(size))
                elif sum(map(len, queues.values())) > self.max_queued:  # many buckets: encode the fullest now
                    yield self._collate(url, queues.pop(max(queues, key=lambda k: len(queues[k]))))
            for queue in queues.values():
                yield self._collate(url, queue)
            yield self._collate(url, [], last=True, skipped=counter.total)

    def _decode(self, raw: dict, counter: SkipCounter) -> dict | None:
        where = f"{raw.get('__url__')}:{raw.get('__key__')}"
        try:
            sample = self.decode(raw, random.Random(f"cache/{raw['__key__']}"))
        except SampleError as exn:
            counter.skip(exn.reason, exn, where)
            return None
        except Exception as exn:
            counter.skip("other", exn, where)
            return None
        return {**sample, "txt": raw.get("txt"), "json": raw.get("json")}

    @staticmethod
    def _collate(url: str, batch: list[dict], last: bool = False, skipped: dict | None = None) -> dict:
        out = {
            "url": url,
            "image": torch.stack([s["image"] for s in batch]) if batch else torch.empty(0),
            "key": [s["key"] for s in batch],
            "txt": [s["txt"] for s in batch],
            "json": [s["json"] for s in batch],
            "last": last,
            "skipped": dict(skipped or {}),
        }
        for name in (*MICRO_KEYS, "crop_coords_flip"):
            if batch and name in batch[0]:
                out[name] = torch.stack([s[name] for s in batch])
        return out


@dataclass
class CacheReport:
    shards_written: int
    shards_skipped: int  # already complete from an earlier run
    samples: int
    skipped_samples: dict[str, int]
    # images written per size (h, w): with buckets, how the data spreads over them
    sizes: dict[tuple[int, int], int] = field(default_factory=dict)

    def size_shares(self) -> str:
        """The share of the images of each size, most common first: '256x256 60.0 %, 320x192 25.0 %, ...'."""
        total = sum(self.sizes.values()) or 1
        ranked = sorted(self.sizes.items(), key=lambda item: -item[1])
        return ", ".join(f"{h}x{w} {100 * n / total:.1f} %" for (h, w), n in ranked)


@torch.no_grad()
def cache_latents(
    autoencoder,
    urls: str | Sequence[str],
    out_dir: str | os.PathLike,
    resolution: int,
    batch_size: int = 32,
    crop: str = "center",
    text_encoder: FrozenOpenCLIPTextEncoder | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    info: dict | None = None,
    progress: bool = True,
    buckets: BucketSpec | Mapping | None = None,
    filters: SampleFilter | Mapping | None = None,
    flips: bool = False,
) -> CacheReport:
    """Encode the shards of `urls` assigned to `rank` (every `world_size`-th) into `out_dir`, one cached shard per
    image shard, same file name. Images are cropped once (`crop`: "center", or one random crop per image, fixed
    by its key): square at `resolution`, or with `buckets` (a `BucketSpec` or its mapping, as `data.buckets`)
    each image at the aspect-ratio bucket nearest its own, with its micro-conditioning. A shard is written to a
    temporary file and renamed when complete, so shards already in `out_dir` are complete and are skipped:
    rerunning after a crash or preemption resumes.

    `filters` (a `SampleFilter` or its mapping, as `data.filters`) leaves out the samples it drops, counted per
    reason, before their images are decoded.

    `flips` also encodes each image mirrored (the same crop, flipped; with buckets, its crop coordinates counted
    from the other side, as the image stream gives them), so that training on the cache can flip (`hflip_prob`):
    twice the encoding and the latent bytes.

    `info` (what made the cache, `cache_info`) goes to `out_dir/cache_info.json` with the settings applied here
    (resolution, crop, buckets: the bucket spec and sizes, or null; filters: their thresholds, or null; flips); rank 0
    writes it, and a cache made with different settings is refused rather than mixed.
    """
    # rank 3 of 2 would take rank 1's shards: two processes writing one temporary file
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    out_dir = Path(out_dir)
    transform = _cache_transform(autoencoder, resolution, crop, buckets)
    keep = SampleFilter.build(filters)
    keep = keep if keep is not None and keep.active else None
    applied = {
        "resolution": int(resolution),
        "crop": crop,
        "buckets": _buckets_info(buckets, resolution),
        "filters": None if keep is None else asdict(keep),
        "flips": bool(flips),
    }
    all_urls = expand_urls(urls)
    names = [shard_name(u) for u in all_urls]
    if len(set(names)) != len(names):
        raise ValueError("input shards must have distinct file names (they name the cached shards)")
    _check_or_write_info(out_dir, {**(info or {}), **applied}, write=rank == 0)
    mine = all_urls[rank::world_size]
    todo = [u for u in mine if not (out_dir / shard_name(u)).is_file()]
    report = CacheReport(
        shards_written=0, shards_skipped=len(mine) - len(todo), samples=0, skipped_samples={}
    )
    if not todo:
        return report
    device = next(autoencoder.parameters()).device
    loader = torch.utils.data.DataLoader(
        _ShardBatches(
            todo,
            ImageDecoder(transform, filters=keep)
            if buckets is None
            else BucketDecoder(ImageDecoder(transform, filters=keep), mirror=flips),
            batch_size,
        ),
        batch_size=None,
        num_workers=min(num_workers, len(todo)),
    )
    writers: dict[str, tuple[wds.TarWriter, Path]] = {}
    bar = _progress(len(todo), progress)
    for batch in loader:
        url = batch["url"]
        if url not in writers:
            tmp = out_dir / f".{shard_name(url)}.tmp"
            writers[url] = (wds.TarWriter(str(tmp)), tmp)
        writer, tmp = writers[url]
        if batch["key"]:
            _write_batch(writer, batch, autoencoder, text_encoder, device, flips)
            report.samples += len(batch["key"])
            size = tuple(batch["image"].shape[-2:])
            report.sizes[size] = report.sizes.get(size, 0) + len(batch["key"])
        if batch["last"]:
            writer.close()
            publish(tmp, out_dir / shard_name(url))  # a resumed job trusts every named shard
            del writers[url]
            report.shards_written += 1
            for reason, n in batch["skipped"].items():
                if n:
                    report.skipped_samples[reason] = report.skipped_samples.get(reason, 0) + n
            bar.update(1)
    bar.close()
    return report


def _cache_transform(autoencoder, resolution: int, crop: str, buckets) -> ImageTransform | BucketTransform:
    """The crop of every cached image; its sizes must be multiples of the autoencoder's downsampling."""
    factor = autoencoder.downsample_factor
    if buckets is None:
        sizes, transform = [(resolution, resolution)], ImageTransform(resolution, crop=crop)
    else:
        transform = BucketTransform.from_spec(buckets, resolution, crop=crop)
        sizes = transform.buckets
    bad = [hw for hw in sizes if hw[0] % factor or hw[1] % factor]
    if bad:
        raise ValueError(
            f"image sizes {bad} are not multiples of the autoencoder's downsampling ({factor}): "
            + ("set buckets.step to a multiple of it" if buckets is not None else "change the resolution")
        )
    return transform


def _write_batch(writer, batch: dict, autoencoder, text_encoder, device, flips: bool = False) -> None:
    images = batch["image"].to(device)
    posterior = autoencoder.encode(images)
    mean, std = posterior.mean, posterior.std
    # the mirrored crops (pixels mirrored, as the image stream flips them) in a second pass: memory as without flips
    if flips:
        mirrored = autoencoder.encode(images.flip(-1))
        mean_flip, std_flip = mirrored.mean, mirrored.std
    cond = text_encoder(_captions(batch)) if text_encoder is not None else None
    for i, key in enumerate(batch["key"]):
        text = {}
        if cond is not None:
            text = {
                "text_tokens": cond.tokens[i],
                "text_pooled": None if cond.pooled is None else cond.pooled[i],
                "text_mask": None if cond.mask is None else cond.mask[i],
            }
        micro = {name: batch[name][i] for name in MICRO_KEYS if name in batch}
        flipped = None
        if flips:
            flipped = {"mean": mean_flip[i], "std": std_flip[i]}
            if "crop_coords_flip" in batch:
                flipped["crop_coords"] = batch["crop_coords_flip"][i]
        member = encode_latents_member(mean[i], std[i], **text, micro=micro, flipped=flipped)
        sample = {"__key__": key, LATENTS_MEMBER: member}
        for ext in ("txt", "json"):
            if batch[ext][i] is not None:
                sample[ext] = batch[ext][i]
        writer.write(sample)


def _captions(batch: dict) -> list[str]:
    """Captions as training reads them (`.txt`, else the json's caption); samples with none never get here."""
    members = [{"txt": t, "json": j} for t, j in zip(batch["txt"], batch["json"], strict=True)]
    return [decode_caption({k: v for k, v in m.items() if v is not None}) for m in members]


_INFO_KEYS_THAT_MUST_MATCH = (
    "autoencoder",
    "encoder_sha256",
    "resolution",
    "crop",
    "buckets",
    "filters",
    "flips",
    "text_encoder",
)
_INFO_DEFAULTS = {
    "buckets": None,
    "filters": None,
    "flips": False,
}  # what a cache_info.json written before the keys existed meant


def _check_or_write_info(out_dir: Path, info: dict, write: bool) -> None:
    path = out_dir / CACHE_INFO
    if path.is_file():
        old = {**_INFO_DEFAULTS, **json.loads(path.read_text())}
        for key in _INFO_KEYS_THAT_MUST_MATCH:
            if key in info and key in old and old[key] != info[key]:
                raise ValueError(
                    f"{out_dir} holds a cache made with a different {key!r} ({old[key]!r}, now {info[key]!r}); "
                    "use another out_dir or delete it"
                )
    elif write:
        write_cache_info(out_dir, info)
    out_dir.mkdir(parents=True, exist_ok=True)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="caching shards", unit="shard", disable=not enabled)
