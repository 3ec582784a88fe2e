"""Cached-latent shards: the autoencoder posterior (and optionally the text encoding) of each image, stored once.

Stage 2 on cached latents neither decodes JPEGs nor runs the autoencoder or the text encoder per step. A cached
shard keeps the keys, captions and json metadata of its image shard and replaces the image with one member

    <key>.latents.safetensors   mean, std: (C, h, w) fp16 — the diagonal-Gaussian posterior q(z | x), unscaled
                                text_tokens (L, D), text_pooled (P,), text_mask (L,) uint8 — only when text is cached
                                original_size, crop_coords, target_size (2,) int64 — only in a bucketed cache

In a cache written with aspect-ratio buckets (`ldm.data.buckets`) each image was encoded at its own bucket, so
(h, w) varies between samples; the stream batches by shape, so every batch is one bucket, and the SDXL
micro-conditioning of each sample travels with it.

Latents are stored before the latent scale/shift is applied, so re-measuring the scale never invalidates a cache.
The folder also holds `cache_info.json`, written by `ldm.latent_cache`: what made the cache (autoencoder checkpoint,
resolution, crop, text encoder identity), which training checks against its own config.
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ldm.data.buckets import MICRO_KEYS
from ldm.data.captions import CaptionMix, caption_fields
from ldm.data.filters import SampleFilter
from ldm.data.stream import ShardStream
from ldm.data.transforms import SampleError, decode_caption
from ldm.data.webdataset import SkipCounter, expand_urls, filter_sample

LATENTS_MEMBER = "latents.safetensors"
CACHE_INFO = "cache_info.json"


def encode_latents_member(
    mean: torch.Tensor,
    std: torch.Tensor,
    text_tokens: torch.Tensor | None = None,
    text_pooled: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    micro: Mapping[str, torch.Tensor] | None = None,
) -> bytes:
    """One sample's cached tensors as safetensors bytes (floats in fp16, the mask as uint8); `micro`: the
    bucketed sample's `MICRO_KEYS` sizes, stored as int64."""
    tensors = {"mean": mean.half(), "std": std.half()}
    for name, value in (micro or {}).items():
        if name not in MICRO_KEYS:
            raise ValueError(f"unknown micro-conditioning entry {name!r}; expected {MICRO_KEYS}")
        tensors[name] = torch.as_tensor(value).long()
    if text_tokens is not None:
        tensors["text_tokens"] = text_tokens.half()
    if text_pooled is not None:
        tensors["text_pooled"] = text_pooled.half()
    if text_mask is not None:
        tensors["text_mask"] = text_mask.to(torch.uint8)
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def decode_latents_member(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of `encode_latents_member`: float32 features (mask as bool), keyed as in the training batch."""
    try:
        tensors = load_safetensors(data)
    except Exception as exn:
        raise SampleError("decode_error", f"unreadable latents: {type(exn).__name__}: {exn}") from exn
    if "mean" not in tensors or "std" not in tensors:
        raise SampleError("decode_error", f"latents member without mean/std (has {sorted(tensors)})")
    out = {"latent_mean": tensors["mean"].float(), "latent_std": tensors["std"].float()}
    for name in ("text_tokens", "text_pooled"):
        if name in tensors:
            out[name] = tensors[name].float()
    if "text_mask" in tensors:
        out["text_mask"] = tensors["text_mask"].bool()
    for name in MICRO_KEYS:
        if name in tensors:
            out[name] = tensors[name].long()
    return out


class DecodeLatents:
    """Raw cached samples → {"latent_mean", "latent_std", ["text_*"], [micro-conditioning], "caption", "key"};
    bad ones counted.

    No augmentation: an autoencoder is not flip-equivariant, so a mirrored latent is not the latent of the
    mirrored image. Crops and flips are fixed when the cache is written.
    """

    def __init__(self, counter: SkipCounter):
        self.counter = counter

    @staticmethod
    def decode(
        sample: dict,
        rng: random.Random | None = None,
        captions: CaptionMix | None = None,
        filters: SampleFilter | None = None,
    ) -> dict:
        """`captions`: draw the caption from these sources with `rng` (the cache keeps every txt/json member).
        `filters`: drop the sample by its json and caption, as for images, before its latents are read; sizes come
        from the json only (the image is not in the cache)."""
        default = decode_caption(sample) if filters is not None else None
        filter_sample(filters, sample, default)
        if LATENTS_MEMBER not in sample:
            raise SampleError("missing_image", f"no .{LATENTS_MEMBER} member")
        out = decode_latents_member(sample[LATENTS_MEMBER])
        out.update(caption_fields(sample, rng, captions, default))
        out["key"] = sample["__key__"]
        return out

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            where = f"{sample.get('__url__')}:{sample.get('__key__')}"
            try:
                yield self.decode(sample)
            except SampleError as exn:
                self.counter.skip(exn.reason, exn, where)
            except Exception as exn:
                self.counter.skip("other", exn, where)


def latent_pipeline(
    urls: str | Sequence[str],
    batch_size: int,
    *,
    shuffle_buffer: int = 1000,
    resampled: bool = True,
    seed: int = 0,
    split_by_node: bool = True,
    partial_batches: bool = False,
    round_shards: int = 8,
    log_every: int = 1000,
    captions: CaptionMix | Mapping | None = None,
    filters: SampleFilter | Mapping | None = None,
) -> ShardStream:
    """Batches from cached-latent shards: {"latent_mean": (B, C, h, w), "latent_std", "caption", "key", ...},
    with "text_tokens" / "text_pooled" / "text_mask" when the cache holds the text encoding, and
    "original_size" / "crop_coords" / "target_size" (B, 2) when it was written with buckets (each batch is then
    one bucket: samples are batched by shape). `captions` draws each caption from several sources, as for
    images (`ldm.data.captions`); `filters` drops samples by their json and caption (`ldm.data.filters`). Same shard
    handling (resampling, splitting, shuffling, skip counting, exact resume) as `image_text_pipeline`."""
    mix, keep = CaptionMix.build(captions), SampleFilter.build(filters)
    keep = keep if keep is not None and keep.active else None
    return ShardStream(
        urls,
        functools.partial(DecodeLatents.decode, captions=mix, filters=keep),
        batch_size,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        split_by_node=split_by_node,
        partial_batches=partial_batches,
        round_shards=round_shards,
        log_every=log_every,
    )


def read_cache_info(urls: str | Sequence[str]) -> dict | None:
    """The `cache_info.json` beside the first local shard of `urls`, or None (remote shards, or no file)."""
    first = expand_urls(urls)[0]
    if first.startswith("pipe:") or "://" in first:
        return None
    path = Path(first).parent / CACHE_INFO
    return json.loads(path.read_text()) if path.is_file() else None


def write_cache_info(out_dir: str | os.PathLike, info: dict) -> Path:
    path = Path(out_dir) / CACHE_INFO
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path
