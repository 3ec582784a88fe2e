"""WebDataset pipeline for image-text shards (img2dataset layout): shards → samples → tensors → batches.

Damaged data is skipped and counted, never fatal and never slept on (webdataset's `warn_and_continue` sleeps
0.5 s per error). Every batch carries how many samples its worker skipped since its previous batch, so the
training process can sum the counts over workers and ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shlex
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from ldm.data.captions import CaptionMix, caption_fields
from ldm.data.filters import FILTER_REASONS, SampleFilter
from ldm.data.transforms import ImageTransform, SampleError, decode_caption, decode_image

logger = logging.getLogger(__name__)

SKIP_REASONS: tuple[str, ...] = (
    "tar_error",
    "missing_image",
    "decode_error",
    "bad_caption",
    "other",
    *FILTER_REASONS,  # samples a `SampleFilter` dropped (they are not damaged, but they are counted alike)
)
IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


@dataclass
class SkipCounter:
    """Skipped samples per reason: `total` since creation, `pending` since the last `take()`.

    A pipeline's stages share one counter; each DataLoader worker holds its own copy.
    """

    log_every: int = 1000
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    pending: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))

    def skip(self, reason: str, error: BaseException | str = "", where: str = "") -> bool:
        """Count one skip; log the first and then every `log_every`-th. Returns True (usable as a handler)."""
        reason = reason if reason in SKIP_REASONS else "other"
        self.total[reason] += 1
        self.pending[reason] += 1
        count = sum(self.total.values())
        if count == 1 or count % self.log_every == 0:
            logger.warning(
                "skipped %d samples so far %s; latest: %s at %s: %s",
                count,
                {k: v for k, v in self.total.items() if v},
                reason,
                where,
                error if isinstance(error, str) else f"{type(error).__name__}: {error}",
            )
        return True

    def take(self) -> dict[str, int]:
        """Skips since the previous call, per reason; resets them."""
        taken = dict(self.pending)
        self.pending = dict.fromkeys(SKIP_REASONS, 0)
        return taken


def expand_urls(urls: str | Iterable[str]) -> list[str]:
    """Shard URLs from a brace pattern, a `::`-separated list of them, a local folder (its *.tar files, sorted),
    or a list of any of these."""
    items = [urls] if isinstance(urls, str) else list(urls)
    expanded = [
        shard
        for item in items
        for part in str(item).split("::")
        for url in braceexpand.braceexpand(part.strip())
        if url.strip()
        for shard in _folder_shards(url.strip())
    ]
    if not expanded:
        raise ValueError(f"no shard URLs in {urls!r}")
    return expanded


def _folder_shards(url: str) -> list[str]:
    if url.startswith("pipe:") or "://" in url or not os.path.isdir(url):
        return [url]
    shards = sorted(str(p) for p in Path(url).glob("*.tar"))
    if not shards:
        raise ValueError(f"folder {url} holds no .tar shards")
    return shards


_META_FILE = re.compile(r"(^|/)__[^/]*__($|/)")


class _StrictTarInfo(tarfile.TarInfo):
    """A tar ends with a zero block. `tarfile` also ends quietly where the data stops at a header (or a header is
    garbage): a stream cut on a 512-byte boundary would pass for a complete shard, its last sample perhaps
    without its caption. Here that is an error, like a cut inside a member."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as exn:
            raise tarfile.ReadError(f"unexpected end of data at offset {tar.offset} ({exn})") from None
        except tarfile.InvalidHeaderError as exn:
            raise tarfile.ReadError(f"invalid header at offset {tar.offset} ({exn})") from None


def _tar_members_to_samples(stream, url: str) -> Iterator[dict]:
    """Group consecutive members with the same key; a sample is yielded only once complete."""
    current: dict | None = None
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
        for info in tar:
            if not info.isreg() or _META_FILE.search(info.name):
                continue
            key, ext = base_plus_ext(info.name)
            if key is None:
                continue
            if current is not None and key != current["__key__"]:
                yield current  # complete: a header with a new key has been read
                current = None
            data = tar.extractfile(info).read()
            tar.members = []  # a streaming TarFile otherwise keeps every header of the shard
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext.lower()] = data
    if current is not None:
        yield current


def _close_quietly(stream) -> None:
    with contextlib.suppress(Exception):  # a pipe closed early reports SIGPIPE; nothing to recover
        stream.close()


def curl_command(url: str) -> str:
    """The `pipe:` command that reads an http(s) URL: fails on HTTP errors and on a transfer cut short (a non-zero
    exit, which `TarSamples` retries), follows redirects, and leaves the retrying to `TarSamples`."""
    return f"pipe:curl -s -L --fail {shlex.quote(url)}"


def is_remote(url: str) -> bool:
    """Read through a command or over a network (errors may be transient), rather than from a local file."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file:"))


def open_shard(url: str):
    """A binary stream of a shard: a local path, a `pipe:` command, or an http(s) URL (read with curl)."""
    if url.startswith(("http://", "https://")):
        url = curl_command(url)
    return wds.gopen(url, "rb")


def _drain(stream, chunk: int = 1 << 16) -> None:
    """Read what follows the tar's end-of-archive blocks, so that a pipe's command exits by itself (its status
    then tells whether the transfer was complete) rather than by a broken pipe."""
    while stream.read(chunk):
        pass


class TarSamples:
    """Shards (dicts with a `url`) → raw samples ({"__key__", "__url__", ext: bytes}).

    An error in opening or reading a remote shard (`pipe:` or http(s) URL: a non-zero exit of the command, a
    refused or cut connection, a truncated stream) is retried up to `retries` times, after `backoff` seconds,
    doubling; a retry reads the shard again from its start and passes over the samples already yielded, so no
    sample is seen twice. A local shard is read once: its damage is permanent. A shard that still fails ends
    there: the partly read sample is dropped and the event is counted once as "tar_error". Unlike
    webdataset's `tarfile_to_samples`, a partial sample can never be merged with the next shard's first one.
    """

    def __init__(self, counter: SkipCounter, retries: int = 3, backoff: float = 0.25):
        self.counter, self.retries, self.backoff = counter, max(0, retries), backoff

    def __call__(self, shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            yield from self.read(shard["url"])

    def read(self, url: str) -> Iterator[dict]:
        """The samples of one shard, each once, however many attempts reading it takes."""
        yielded = 0  # complete samples of this shard passed on
        attempts = 1 + (self.retries if is_remote(url) else 0)
        error = ""
        for attempt in range(attempts):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                logger.info(
                    "shard %s: retry %d/%d in %.2f s after %s", url, attempt, attempts - 1, delay, error
                )
                time.sleep(delay)
            try:
                stream = open_shard(url)
            except Exception as exn:
                error = f"{type(exn).__name__}: {exn}"
                continue
            try:
                for index, sample in enumerate(_tar_members_to_samples(stream, url)):
                    if index >= yielded:  # on a retry, the samples before were delivered by a failed attempt
                        yielded += 1
                        yield sample
                _drain(stream)
                stream.close()  # a `pipe:` command's exit status is checked here
                return
            except GeneratorExit:
                _close_quietly(stream)
                raise
            except Exception as exn:
                _close_quietly(stream)
                error = f"{type(exn).__name__}: {exn}"
        self.counter.skip("tar_error", error + (f" ({attempts} attempts)" if attempts > 1 else ""), url)


class ImageDecoder:
    """A raw sample → {"image": (3, R, R) float in [-1, 1], "caption": str, "key": str}; raises SampleError.

    With `filters`, a sample they reject raises SampleError(<its filter reason>) before its image is decoded; they
    judge the default caption (`.txt`, else the json's caption: the alt text). With `captions` (a `CaptionMix`),
    the training caption is drawn from its sources with `rng` after the image's crop, so crops do not change.
    """

    def __init__(
        self,
        transform: ImageTransform,
        image_keys: Sequence[str] = IMAGE_KEYS,
        filters: SampleFilter | None = None,
        captions: CaptionMix | None = None,
    ):
        self.transform, self.image_keys = transform, tuple(image_keys)
        self.filters = filters if filters is not None and filters.active else None
        self.captions = captions

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        image_key = next((k for k in self.image_keys if k in sample), None)
        if image_key is None:
            raise SampleError("missing_image", f"no {'/'.join(self.image_keys)} member")
        # the default caption, before the image (a sample with a bad one is counted as bad_caption); not needed
        # when a caption mix replaces it and no filter judges it
        default = None if self.captions is not None and self.filters is None else decode_caption(sample)
        filter_sample(self.filters, sample, default, image_key)
        image = decode_image(sample[image_key], min_size=self.transform.resolution)
        try:
            tensor = self.transform(image, rng)
        except Exception as exn:
            raise SampleError("decode_error", f"transform failed: {type(exn).__name__}: {exn}") from exn
        return {
            "image": tensor,
            **caption_fields(sample, rng, self.captions, default),
            "key": sample["__key__"],
        }


def filter_sample(
    filters: SampleFilter | None, sample: dict, caption: str | None, image_key: str | None = None
) -> None:
    """Raise SampleError(<the filter's reason>) for a sample `filters` drop (`caption`: its default caption, which
    the callers decode whenever there are filters)."""
    if filters is None:
        return
    reason = filters.reason_to_drop(sample, caption, image_key)
    if reason is not None:
        raise SampleError(reason, "dropped by the sample filter")


class Batch:
    """Samples → a batch: tensor fields stacked ({"image": (B, 3, R, R)}), others listed ({"caption": [str]}),
    plus the skips since the previous batch: {"n_skipped": (), "skipped": {reason: ()}}.

    `ShardStream` decides which samples form a batch (one queue per `shape_key`, i.e. per aspect-ratio bucket)
    and when (once the good sample after it arrives or the stream ends: the skips met before go with it).
    """

    def __init__(self, batch_size: int, counter: SkipCounter):
        self.batch_size, self.counter = batch_size, counter

    def collate(self, samples: list[dict]) -> dict:
        skipped = self.counter.take()
        batch = {
            name: torch.stack(values) if isinstance(values[0], torch.Tensor) else values
            for name in samples[0]
            for values in [[s[name] for s in samples]]
        }
        batch["n_skipped"] = torch.tensor(sum(skipped.values()), dtype=torch.long)
        batch["skipped"] = {reason: torch.tensor(n, dtype=torch.long) for reason, n in skipped.items()}
        return batch

    @staticmethod
    def shape_key(sample: dict) -> tuple:
        """What the samples of one batch share: the name and shape of each tensor (one key per bucket)."""
        return tuple((name, tuple(v.shape)) for name, v in sample.items() if isinstance(v, torch.Tensor))


def image_text_pipeline(
    urls: str | Sequence[str],
    resolution: int,
    batch_size: int,
    *,
    crop: str = "random",
    shuffle_buffer: int = 1000,
    resampled: bool = True,
    seed: int = 0,
    split_by_node: bool = True,
    image_keys: Sequence[str] = IMAGE_KEYS,
    partial_batches: bool = False,
    hflip_prob: float = 0.0,
    round_shards: int = 8,
    log_every: int = 1000,
    filters: SampleFilter | None = None,
    shard_retries: int = 3,
    retry_backoff: float = 0.25,
    buckets: Mapping | None = None,
    captions: CaptionMix | Mapping | None = None,
):
    """Batches of images and captions from WebDataset shards, for `DataLoader(pipeline, batch_size=None)`
    (a `ldm.data.stream.ShardStream`: resumable at the exact sample with `ResumableLoader`).

    urls: brace patterns ("/data/shards-{000000..000099}.tar"), `::`-separated lists, lists of either,
        local paths, `pipe:` commands ("pipe:aws s3 cp s3://bucket/shard.tar -") or http(s) URLs (read with
        `curl -s -L --fail`).
    resampled: True → an endless stream of shards drawn with replacement, seeded per rank and worker, in
        rounds of `round_shards` shards; False → each shard once per epoch, split across ranks
        (`split_by_node`) and workers.
    shuffle_buffer: samples held for shuffling; 0 also keeps the shards in order (for validation).
    filters: drop samples by their json metadata and caption before decoding (`ldm.data.filters`), each
        counted under its own skip reason.
    shard_retries, retry_backoff: a remote shard whose reading fails is read again (passing over the samples
        already delivered) up to `shard_retries` times, after `retry_backoff` seconds, doubling.
    buckets: None → square crops of `resolution`; a `ldm.data.buckets.BucketSpec` or its mapping ({step,
        max_ratio, base}) → aspect-ratio buckets of about `resolution`² pixels, each batch from one bucket,
        samples with `original_size` / `crop_coords` / `target_size` (SDXL micro-conditioning).
    captions: None → the `.txt` caption, else the json's; a `ldm.data.captions.CaptionMix` or its mapping
        ({json.recaption: 0.95, txt: 0.05}) → one drawn per sample visit from those sources.
    """
    from ldm.data.buckets import BucketDecoder, BucketTransform
    from ldm.data.stream import ShardStream  # the stream builds on this module's stages

    transform = ImageTransform(resolution, crop=crop, hflip_prob=hflip_prob)
    if buckets is not None:
        transform = BucketTransform.from_spec(buckets, resolution, crop=crop, hflip_prob=hflip_prob)
    decode = ImageDecoder(transform, image_keys, filters, CaptionMix.build(captions))
    return ShardStream(
        urls,
        decode if buckets is None else BucketDecoder(decode),
        batch_size,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        split_by_node=split_by_node,
        partial_batches=partial_batches,
        round_shards=round_shards,
        log_every=log_every,
        shard_retries=shard_retries,
        retry_backoff=retry_backoff,
    )
