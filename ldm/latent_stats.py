"""Latent statistics of a trained autoencoder: mean and std of its latents over a sample of the data.

`LatentMoments` / `measure_latent_stats` pool them over ranks; the latent scale 1/std (Rombach et al. 2022,
sec. 4.3.2 / appendix G) and the optional shift are set from them and stored in the autoencoder checkpoint
(`store_latent_stats`, `latent_description`): nothing hard-codes a scale.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ldm.data.webdataset import image_text_pipeline
from ldm.models.autoencoder import DiagonalGaussian
from ldm.utils.checkpoint import BUNDLE_KEY, atomic_save, load_checkpoint
from ldm.utils.launcher import collective_device


@dataclass
class LatentStats:
    mean: float
    std: float
    channel_mean: list[float]
    channel_std: list[float]
    num_samples: int

    @property
    def scale(self) -> float:
        """The factor that gives the diffusion model unit-variance latents: 1 / std."""
        return 1.0 / self.std

    def as_dict(self) -> dict:
        return {**asdict(self), "scale": self.scale}


class LatentMoments:
    """Running sums of latents per channel in float64; `stats()` pools them over all ranks when distributed."""

    def __init__(self, channels: int) -> None:
        self.sums = torch.zeros(3, channels, dtype=torch.float64)  # Σz, Σz², count per channel
        self.num_samples = 0

    def update(self, z: Tensor) -> None:
        """Add a batch of latents (B, C, h, w)."""
        self.num_samples += z.shape[0]
        z = z.detach().to("cpu", torch.float64).transpose(0, 1).flatten(1)  # (C, B·h·w)
        self.sums += torch.stack([z.sum(1), z.square().sum(1), torch.full_like(z[:, 0], z.shape[1])])

    def stats(self, pool: bool = True) -> LatentStats:
        """Mean and std over everything seen, on this rank only or (`pool`) over all ranks, which must all call;
        `num_samples` counts the images of the same ranks as the statistics."""
        sums, num_samples = self.sums.clone(), self.num_samples
        if pool and (device := collective_device()) is not None:
            packed = torch.cat([sums.flatten(), sums.new_tensor([num_samples])]).to(device)
            dist.all_reduce(packed)
            packed = packed.cpu()
            sums, num_samples = packed[:-1].view_as(sums), int(packed[-1])
        total, total_sq, count = sums
        if float(count.sum()) == 0:
            raise ValueError("no latents to measure: the data gave no samples")
        channel_mean = total / count
        channel_var = (total_sq / count - channel_mean.square()).clamp_min(0)
        mean = total.sum() / count.sum()
        var = (total_sq.sum() / count.sum() - mean.square()).clamp_min(1e-24)
        return LatentStats(
            mean=float(mean),
            std=float(var.sqrt()),
            channel_mean=channel_mean.tolist(),
            channel_std=channel_var.sqrt().tolist(),
            num_samples=num_samples,
        )


@torch.no_grad()
def measure_latent_stats(
    encode: Callable[[Tensor], DiagonalGaussian],
    batches: Iterable[Tensor],
    max_samples: int,
    sample_posterior: bool = True,
    generator: torch.Generator | None = None,
    pool: bool = False,
) -> LatentStats:
    """Latent statistics over up to `max_samples` images (per rank) from `batches` (B, 3, H, W) in [-1, 1].

    Latents are drawn from the posterior (what stage 2 trains on) unless `sample_posterior` is False. With `pool`,
    every rank measures its own batches and the statistics are pooled (all ranks must call).
    """
    moments: LatentMoments | None = None
    for images in batches:
        posterior = encode(images)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        z = z[: max_samples - (moments.num_samples if moments else 0)]
        moments = moments or LatentMoments(z.shape[1])
        moments.update(z)
        if moments.num_samples >= max_samples:
            break
    if moments is None:
        raise ValueError("no latents to measure: the data gave no samples")
    return moments.stats(pool)


def image_batches(
    urls: str | Sequence[str],
    resolution: int,
    batch_size: int,
    device="cpu",
    seed: int = 0,
    num_workers: int = 2,
) -> Iterator[Tensor]:
    """Centre-cropped image batches from one shuffled pass over `urls` (for measuring, not training)."""
    pipeline = image_text_pipeline(
        urls,
        resolution,
        batch_size,
        crop="center",
        split_by_node=False,
        shuffle_buffer=256,
        resampled=False,
        seed=seed,
        partial_batches=True,
    )
    generator = torch.Generator().manual_seed(seed)  # the workers' seeds: not from the global generator
    loader = torch.utils.data.DataLoader(
        pipeline, batch_size=None, num_workers=num_workers, generator=generator
    )
    for batch in loader:
        yield batch["image"].to(device)


def store_latent_stats(
    ckpt_path: str | os.PathLike,
    stats: LatentStats,
    use_shift: bool = False,
    out: str | os.PathLike | None = None,
) -> Path:
    """Write the latent scale (and shift, or 0) and the full statistics into a stage-1 checkpoint's description."""
    ckpt = load_checkpoint(ckpt_path)
    bundle = ckpt.get(BUNDLE_KEY) or {}
    if bundle.get("stage") != "autoencoder":
        raise ValueError(f"{ckpt_path} is not a stage-1 (autoencoder) checkpoint")
    bundle.update(latent_description(stats, use_shift))
    path = Path(out or ckpt_path)
    atomic_save(ckpt, path)
    return path


def latent_description(stats: LatentStats, use_shift: bool = False) -> dict:
    """The checkpoint entries stage 2 reads: latent_scale, latent_shift, and the statistics they came from."""
    return {
        "latent_scale": stats.scale,
        "latent_shift": stats.mean if use_shift else 0.0,
        "latent_stats": stats.as_dict(),
    }
