"""The evaluation set of generated images: captions, which image gets which caption and seed, who makes it.

Image i uses caption i mod len(captions) and the initial noise of seed `seed + i`. Images are made in global
batches of `batch_size` consecutive indices, and batch b goes to process b mod world_size, so every batch (and so
every image, also with a stochastic sampler, whose step noise the pipeline seeds per batch) is the same whatever
the number of processes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from eval.features import to_uint8
from ldm.data.transforms import SampleError, decode_caption
from ldm.data.webdataset import SkipCounter, TarSamples, expand_urls
from ldm.inference import read_prompts
from ldm.utils.images import save_png, to_pil

# (prompts, seeds) → images (B, 3, H, W) in [0, 1]: a TextToImage pipeline, or a training module's EMA weights
Generate = Callable[[list[str], list[int]], Tensor]


@dataclass(frozen=True)
class Captions:
    texts: list[str]
    source: str

    def describe(self) -> dict:
        digest = hashlib.sha256("\n".join(self.texts).encode()).hexdigest()[:16]
        return {"source": self.source, "num_captions": len(self.texts), "sha256": digest}


def shard_captions(urls: str | Sequence[str], limit: int) -> list[str]:
    """The first `limit` captions of the shards, in shard and member order."""
    counter, captions = SkipCounter(log_every=100), []
    for sample in TarSamples(counter)({"url": u} for u in expand_urls(urls)):
        try:
            captions.append(decode_caption(sample))
        except SampleError as exn:
            counter.skip(exn.reason, exn, f"{sample['__url__']}:{sample['__key__']}")
            continue
        if len(captions) >= limit:
            break
    return captions


def load_captions(
    prompts: str | os.PathLike | Sequence[str] | None = None,
    captions_from: str | Sequence[str] | None = None,
    limit: int | None = None,
) -> Captions:
    """Captions from a text file (one per line; `#` lines skipped) or a list; else the first `limit` of shards."""
    if isinstance(prompts, str | os.PathLike):
        if not Path(prompts).is_file():
            raise FileNotFoundError(
                f"prompts={prompts}: no such file (give a text file or a list of captions)"
            )
        return Captions(read_prompts(prompts_file=prompts), f"file:{prompts}")
    if prompts:
        return Captions(read_prompts(list(prompts)), "list")
    if captions_from:
        texts = shard_captions(captions_from, limit or 10**9)
        if not texts:
            raise ValueError(f"no captions in captions_from={captions_from!r}")
        return Captions(texts, f"shards:{captions_from}")
    raise ValueError(
        "no captions: set prompts=captions.txt, prompts='[a caption, another]' or captions_from="
    )


@dataclass(frozen=True)
class Batch:
    indices: list[int]
    captions: list[str]
    seeds: list[int]


def plan_batches(
    num_images: int, captions: Sequence[str], seed: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> list[Batch]:
    """This process's batches: global batch b (indices b·B … b·B + B - 1) when b ≡ rank (mod world_size)."""
    if not captions:
        raise ValueError("no captions to generate from")
    num_batches = -(-num_images // batch_size)
    if num_batches < world_size:
        raise ValueError(
            f"{num_images} images in batches of {batch_size} give {num_batches} batches for {world_size} "
            "processes; lower batch_size so that every process gets one"
        )
    batches = []
    for b in range(rank, num_batches, world_size):
        indices = list(range(b * batch_size, min((b + 1) * batch_size, num_images)))
        batches.append(
            Batch(indices, [captions[i % len(captions)] for i in indices], [seed + i for i in indices])
        )
    return batches


def generated_batches(
    generate: Generate,
    batches: Sequence[Batch],
    save_dir: str | os.PathLike | None = None,
    save_first: int = 0,
    metadata: dict | None = None,
    progress: bool = False,
) -> Iterator[tuple[Batch, Tensor]]:
    """(batch, uint8 images (B, 3, H, W)) for each planned batch; the first `save_first` indices are also written
    as PNGs (`<index>.png`, caption and seed in the metadata) to `save_dir`."""
    from tqdm import tqdm

    for batch in tqdm(batches, desc="generating", disable=not progress, unit="batch"):
        images = to_uint8(generate(batch.captions, batch.seeds).cpu())
        if save_dir is not None:
            for i, caption, s, image in zip(batch.indices, batch.captions, batch.seeds, images, strict=True):
                if i < save_first:
                    meta = {"index": i, "prompt": caption, "seed": s, **(metadata or {})}
                    save_png(to_pil(image.float() / 255), Path(save_dir) / f"{i:06d}.png", meta)
        yield batch, images


def pipeline_generator(
    pipe,
    sampler,
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    guidance_interval: Sequence[float] | None = None,
) -> Generate:
    """A `TextToImage` pipeline as a `Generate` callable."""

    def generate(prompts: list[str], seeds: list[int]) -> Tensor:
        with torch.no_grad():
            return pipe(
                prompts,
                sampler,
                guidance_scale=guidance_scale,
                seeds=seeds,
                height=height,
                width=width,
                guidance_interval=guidance_interval,
            )

    return generate


def describe_sampler(sampler) -> dict:
    """The sampler's class and plain settings (num_steps, eta, …), for the result's protocol."""
    settings = {k: v for k, v in vars(sampler).items() if isinstance(v, int | float | str | bool | None)}
    return {"name": type(sampler).__name__, **settings}
