"""LightningDataModules over WebDataset shards: image-text shards, or cached-latent shards (`ldm.data.latents`).

The training loader is a `ResumableLoader`: Lightning saves its position (every worker of every rank) in each
checkpoint, and a resumed run continues with exactly the samples that would have come next.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader

from ldm.data.captions import CaptionMix
from ldm.data.filters import SampleFilter
from ldm.data.latents import latent_pipeline, read_cache_info
from ldm.data.loader import ResumableLoader
from ldm.data.stream import ShardStream
from ldm.data.webdataset import image_text_pipeline


class _ShardDataModule(L.LightningDataModule):
    """Loader settings shared by both kinds of shards. The pipelines batch, so the DataLoader has
    `batch_size=None`; `batch_size` is per process."""

    provides = ""  # "images" or "latents": what a batch holds

    def __init__(
        self,
        train_urls: str | list[str],
        batch_size: int,
        val_urls: str | list[str] | None = None,
        captions: Mapping | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        seed: int = 0,
        prefetch_factor: int | None = 2,
        persistent_workers: bool = True,
        pin_memory: bool = True,
        round_shards: int = 8,
    ):
        super().__init__()
        self.train_urls = train_urls if isinstance(train_urls, str) else list(train_urls)
        self.val_urls = val_urls if val_urls is None or isinstance(val_urls, str) else list(val_urls)
        self.captions = CaptionMix.build(captions)  # checked now, not in a loader worker
        self.batch_size, self.num_workers, self.shuffle_buffer = batch_size, num_workers, shuffle_buffer
        self.resampled, self.seed, self.round_shards = resampled, seed, round_shards
        self.prefetch_factor, self.persistent_workers, self.pin_memory = (
            prefetch_factor,
            persistent_workers,
            pin_memory,
        )

    def _loader(self, pipeline: ShardStream, resumable: bool = False) -> DataLoader:
        kwargs = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "persistent_workers": self.persistent_workers}
        if resumable:
            return ResumableLoader(
                pipeline,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory and torch.cuda.is_available(),
                **kwargs,
            )
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            **kwargs,
        )


class ImageTextDataModule(_ShardDataModule):
    """Train (random crops, endless resampled shards by default) and optional val (centre crops, one pass
    over the shards in order) loaders of images in [-1, 1] and captions.

    filters: a `SampleFilter`, or a mapping of its arguments (a config node), applied to train and val
        samples before decoding; None keeps every sample that decodes.
    shard_retries, retry_backoff: how often, and after how long (seconds, doubling), a remote shard whose
        reading fails is read again.
    buckets: aspect-ratio buckets for training ({step, max_ratio, base}, `ldm.data.buckets`); None: square
        crops. Validation stays square (centre crops of `resolution`).
    captions: several caption sources drawn by weight per sample ({json.recaption: 0.95, txt: 0.05},
        `ldm.data.captions`), for train and val; None: `.txt`, else the json's caption.
    """

    provides = "images"

    def __init__(
        self,
        train_urls: str | list[str],
        resolution: int,
        batch_size: int,
        val_urls: str | list[str] | None = None,
        crop: str = "random",
        hflip_prob: float = 0.0,
        filters: SampleFilter | Mapping | None = None,
        shard_retries: int = 3,
        retry_backoff: float = 0.25,
        buckets: Mapping | None = None,
        captions: Mapping | None = None,
        **loader_settings,
    ):
        super().__init__(train_urls, batch_size, val_urls, captions, **loader_settings)
        self.resolution, self.crop, self.hflip_prob = resolution, crop, _probability("hflip_prob", hflip_prob)
        self.filters = SampleFilter.build(filters)
        self.remote = {"shard_retries": shard_retries, "retry_backoff": retry_backoff}
        self.buckets = dict(buckets) if buckets is not None else None  # training only: val stays square

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            image_text_pipeline(
                self.train_urls,
                self.resolution,
                self.batch_size,
                crop=self.crop,
                shuffle_buffer=self.shuffle_buffer,
                resampled=self.resampled,
                seed=self.seed,
                hflip_prob=self.hflip_prob,
                round_shards=self.round_shards,
                filters=self.filters,
                **self.remote,
                buckets=self.buckets,
                captions=self.captions,
            ),
            resumable=True,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_urls is None:
            return []
        return self._loader(
            image_text_pipeline(
                self.val_urls,
                self.resolution,
                self.batch_size,
                crop="center",
                shuffle_buffer=0,
                resampled=False,
                seed=self.seed,
                partial_batches=True,
                filters=self.filters,
                **self.remote,
                captions=self.captions,
            )
        )


class CachedLatentDataModule(_ShardDataModule):
    """Batches of cached autoencoder posteriors (and text encodings, when cached) for stage 2.

    `resolution` is that of the images the cache was made from; null takes it from the cache's `cache_info.json`.
    `captions` and `filters` as for images (the cache keeps every txt and json member of its image shards); a
    filter's sizes come from the json only. `hflip_prob` mirrors training samples (never held-out ones) by taking
    the latents of the mirrored image, which a cache written with `flips=true` holds.
    """

    provides = "latents"

    def __init__(
        self,
        train_urls: str | list[str],
        batch_size: int,
        resolution: int | None = None,
        captions: Mapping | None = None,
        filters: SampleFilter | Mapping | None = None,
        hflip_prob: float = 0.0,
        **loader_settings,
    ):
        super().__init__(train_urls, batch_size, captions=captions, **loader_settings)
        self.resolution, self.hflip_prob = resolution, _probability("hflip_prob", hflip_prob)
        self.filters = SampleFilter.build(filters)

    def cache_info(self) -> dict | None:
        return read_cache_info(self.train_urls)

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            latent_pipeline(
                self.train_urls,
                self.batch_size,
                shuffle_buffer=self.shuffle_buffer,
                resampled=self.resampled,
                seed=self.seed,
                round_shards=self.round_shards,
                captions=self.captions,
                filters=self.filters,
                hflip_prob=self.hflip_prob,
            ),
            resumable=True,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_urls is None:
            return []
        return self._loader(
            latent_pipeline(
                self.val_urls,
                self.batch_size,
                shuffle_buffer=0,
                resampled=False,
                partial_batches=True,
                seed=self.seed,
                captions=self.captions,
                filters=self.filters,
            )
        )


def _probability(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"data.{name} must be in [0, 1], got {value}")
    return float(value)
