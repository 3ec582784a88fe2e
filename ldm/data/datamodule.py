"""LightningDataModule over WebDataset image-text shards."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from ldm.data.webdataset import image_text_pipeline


class ImageTextDataModule(L.LightningDataModule):
    """Train (random crops, endless resampled shards by default) and optional val (centre crops, one pass
    over the shards in order) loaders. The pipeline batches, so the DataLoader has `batch_size=None`;
    `batch_size` is per process."""

    def __init__(
        self,
        train_urls: str | list[str],
        resolution: int,
        batch_size: int,
        val_urls: str | list[str] | None = None,
        num_workers: int = 4,
        crop: str = "random",
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        seed: int = 0,
        prefetch_factor: int | None = 2,
        persistent_workers: bool = True,
        pin_memory: bool = True,
        hflip_prob: float = 0.0,
    ):
        super().__init__()
        self.train_urls = train_urls if isinstance(train_urls, str) else list(train_urls)
        self.val_urls = val_urls if val_urls is None or isinstance(val_urls, str) else list(val_urls)
        self.resolution, self.batch_size = resolution, batch_size
        self.num_workers, self.crop, self.shuffle_buffer = num_workers, crop, shuffle_buffer
        self.resampled, self.seed, self.hflip_prob = resampled, seed, hflip_prob
        self.prefetch_factor, self.persistent_workers, self.pin_memory = (
            prefetch_factor,
            persistent_workers,
            pin_memory,
        )

    def _loader(self, pipeline) -> DataLoader:
        kwargs = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "persistent_workers": self.persistent_workers}
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            **kwargs,
        )

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
            )
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
            )
        )
