"""Cached-latent shards: the autoencoder posterior (and optionally the text encoding) of each image, stored once.

Stage 2 on cached latents neither decodes JPEGs nor runs the autoencoder or the text encoder per step. A cached
shard keeps the keys, captions and json metadata of its image shard and replaces the image with one member

    <key>.latents.safetensors   mean, std: (C, h, w) fp16 — the diagonal-Gaussian posterior q(z | x), unscaled
                                text_tokens (L, D), text_pooled (P,), text_mask (L,) uint8 — only when text is cached
                                original_size, crop_coords, target_size (2,) int64 — only in a bucketed cache
                                mean_flip, std_flip (C, h, w) fp16 — the posterior of the mirrored image, and
                                crop_coords_flip (2,) int64 when bucketed — only in a cache written with flips

In a cache written with aspect-ratio buckets (`ldm.data.buckets`) each image was encoded at its own bucket, so
(h, w) varies between samples; the stream batches by shape, so every batch is one bucket, and the SDXL
micro-conditioning of each sample travels with it.

A latent cannot be mirrored after the fact (an autoencoder is not flip-equivariant: the mirrored latent is not the
latent of the mirrored image), so a cache written with `flips=true` encodes both orientations and the stream picks
one per visit (`hflip_prob`), as the image stream flips its pixels.

Latents are stored before the latent scale/shift is applied, so re-measuring the scale never invalidates a cache.
The folder also holds `cache_info.json`, written by `ldm.latent_cache`: what made the cache (autoencoder checkpoint,
resolution, crop, text encoder identity), which training checks against its own config.
"""

from __future__ import annotations

import functools
import hashlib
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
    flipped: Mapping[str, torch.Tensor] | None = None,
) -> bytes:
    """One sample's cached tensors as safetensors bytes (floats in fp16, the mask as uint8); `micro`: the
    bucketed sample's `MICRO_KEYS` sizes, stored as int64; `flipped`: the mirrored image's {"mean", "std"} and,
    when bucketed, its {"crop_coords"}, stored with a `_flip` suffix."""
    tensors = {"mean": mean.half(), "std": std.half()}
    for name, value in (micro or {}).items():
        if name not in MICRO_KEYS:
            raise ValueError(f"unknown micro-conditioning entry {name!r}; expected {MICRO_KEYS}")
        tensors[name] = torch.as_tensor(value).long()
    if flipped is not None:
        if set(flipped) - {"mean", "std", "crop_coords"} or not {"mean", "std"} <= set(flipped):
            raise ValueError(
                f"flipped needs mean and std (and crop_coords if bucketed), got {sorted(flipped)}"
            )
        if ("crop_coords" in flipped) != ("crop_coords" in tensors):
            raise ValueError("flipped crop_coords go with a bucketed sample's micro-conditioning only")
        tensors["mean_flip"], tensors["std_flip"] = flipped["mean"].half(), flipped["std"].half()
        if "crop_coords" in flipped:
            tensors["crop_coords_flip"] = torch.as_tensor(flipped["crop_coords"]).long()
    if text_tokens is not None:
        tensors["text_tokens"] = text_tokens.half()
    if text_pooled is not None:
        tensors["text_pooled"] = text_pooled.half()
    if text_mask is not None:
        tensors["text_mask"] = text_mask.to(torch.uint8)
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def decode_latents_member(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of `encode_latents_member`: float32 features (mask as bool), keyed as in the training batch; the
    mirrored image's, when cached, as "latent_mean_flip", "latent_std_flip" and "crop_coords_flip"."""
    tensors = _load_member(data)
    out = _features(tensors, mirrored=False)
    if _has_mirrored(tensors):
        mirrored = _features(tensors, mirrored=True)
        out.update(
            {
                f"{name}_flip": mirrored[name]
                for name in ("latent_mean", "latent_std", "crop_coords")
                if name in mirrored
            }
        )
    return out


def _load_member(data: bytes) -> dict[str, torch.Tensor]:
    try:
        tensors = load_safetensors(data)
    except Exception as exn:
        raise SampleError("decode_error", f"unreadable latents: {type(exn).__name__}: {exn}") from exn
    if "mean" not in tensors or "std" not in tensors:
        raise SampleError("decode_error", f"latents member without mean/std (has {sorted(tensors)})")
    return tensors


def _has_mirrored(tensors: dict[str, torch.Tensor]) -> bool:
    return "mean_flip" in tensors and "std_flip" in tensors


def _features(tensors: dict[str, torch.Tensor], mirrored: bool) -> dict[str, torch.Tensor]:
    """One orientation's features, converted for the batch: the cached image's, or its mirror image's (`_flip`
    tensors, the crop coordinates included); the other orientation is left as stored."""
    flip = "_flip" if mirrored else ""
    out = {"latent_mean": tensors["mean" + flip].float(), "latent_std": tensors["std" + flip].float()}
    for name in ("text_tokens", "text_pooled"):
        if name in tensors:
            out[name] = tensors[name].float()
    if "text_mask" in tensors:
        out["text_mask"] = tensors["text_mask"].bool()
    for name in MICRO_KEYS:
        if name in tensors:
            out[name] = tensors[f"{name}_flip" if mirrored and f"{name}_flip" in tensors else name].long()
    return out


def _draw_mirrored(tensors: dict[str, torch.Tensor], rng: random.Random | None, hflip_prob: float) -> bool:
    """Whether this visit takes the mirrored image's latents: with probability `hflip_prob`, which needs a cache
    written with flips."""
    if hflip_prob <= 0:
        return False
    if not _has_mirrored(tensors):
        raise SampleError(
            "decode_error",
            f"data.hflip_prob={hflip_prob}, but the cache holds no mirrored latents: cache the images again with "
            "flips=true (scripts/cache_latents.py) or set data.hflip_prob=0",
        )
    return (rng if rng is not None else random.Random()).random() < hflip_prob


class DecodeLatents:
    """Raw cached samples → {"latent_mean", "latent_std", ["text_*"], [micro-conditioning], "caption", "key"};
    bad ones counted.

    Crops are fixed when the cache is written. Flips (`hflip_prob`) need a cache written with `flips=true`, which
    holds the latents of both orientations: a mirrored latent is not the latent of the mirrored image.
    """

    def __init__(self, counter: SkipCounter):
        self.counter = counter

    @staticmethod
    def decode(
        sample: dict,
        rng: random.Random | None = None,
        captions: CaptionMix | None = None,
        filters: SampleFilter | None = None,
        hflip_prob: float = 0.0,
    ) -> dict:
        """`captions`: draw the caption from these sources with `rng` (the cache keeps every txt/json member).
        `filters`: drop the sample by its json and caption, as for images, before its latents are read; sizes come
        from the json only (the image is not in the cache). `hflip_prob`: take the mirrored image's latents (and
        crop coordinates) with this probability, drawn with `rng` before the caption, as the image stream does."""
        default = decode_caption(sample) if filters is not None else None
        filter_sample(filters, sample, default)
        if LATENTS_MEMBER not in sample:
            raise SampleError("missing_image", f"no .{LATENTS_MEMBER} member")
        tensors = _load_member(sample[LATENTS_MEMBER])
        out = _features(tensors, _draw_mirrored(tensors, rng, hflip_prob))  # the other orientation stays fp16
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
    hflip_prob: float = 0.0,
) -> ShardStream:
    """Batches from cached-latent shards: {"latent_mean": (B, C, h, w), "latent_std", "caption", "key", ...},
    with "text_tokens" / "text_pooled" / "text_mask" when the cache holds the text encoding, and
    "original_size" / "crop_coords" / "target_size" (B, 2) when it was written with buckets (each batch is then
    one bucket: samples are batched by shape). `captions` draws each caption from several sources, as for
    images (`ldm.data.captions`); `filters` drops samples by their json and caption (`ldm.data.filters`);
    `hflip_prob` mirrors samples, given a cache written with flips (`DecodeLatents.decode`). Same shard
    handling (resampling, splitting, shuffling, skip counting, exact resume) as `image_text_pipeline`."""
    mix, keep = CaptionMix.build(captions), SampleFilter.build(filters)
    keep = keep if keep is not None and keep.active else None
    return ShardStream(
        urls,
        functools.partial(DecodeLatents.decode, captions=mix, filters=keep, hflip_prob=hflip_prob),
        batch_size,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        split_by_node=split_by_node,
        partial_batches=partial_batches,
        round_shards=round_shards,
        log_every=log_every,
    )


ENCODING_WEIGHTS = ("encoder.", "quant_conv.")  # what maps an image to its latent posterior


def encoder_digest(autoencoder_state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) of the autoencoder weights that make latents (`encoder.*`, `quant_conv.*`; names,
    dtypes, shapes and values): the same for a copy of a stage-1 checkpoint or one whose decoder alone was tuned,
    different for another step of the stage-1 run. A cache records it (`cache_info.json`: `encoder_sha256`) and
    training compares it with its `autoencoder_ckpt`'s.

    16-bit floats are hashed as their exact float32 values: the cache hashes the loaded (float32) module, training
    the checkpoint as stored, which is bf16 after `precision: bf16-true`; float32 weights hash as before."""
    digest = hashlib.sha256()
    names = sorted(k for k in autoencoder_state if k.startswith(ENCODING_WEIGHTS))
    if not names:
        raise ValueError("no encoder weights (encoder.*, quant_conv.*) in this autoencoder state dict")
    for name in names:
        tensor = autoencoder_state[name].detach().cpu().contiguous()
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


CACHE_KEYS_THAT_MUST_AGREE = (
    "autoencoder",
    "encoder_sha256",
    "resolution",
    "buckets",
    "flips",
    "text_encoder",
)


def read_cache_info(urls: str | Sequence[str]) -> dict | None:
    """The `cache_info.json` beside the first local shard of `urls`, or None (remote shards, or no file).

    `urls` may span several cache folders (`a/{0..9}.tar::b/{0..9}.tar`): training checks the first folder's info
    only, so every other local folder's must agree with it on what training checks (`CACHE_KEYS_THAT_MUST_AGREE`),
    or latents of another encoder, size or text encoder would pass unnoticed."""
    shards = expand_urls(urls)
    local = [u for u in shards if not (u.startswith("pipe:") or "://" in u)]
    first = shards[0]
    if first not in local:
        return None
    path = Path(first).parent / CACHE_INFO
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    for folder in dict.fromkeys(Path(u).parent for u in local):
        if folder == path.parent or not (folder / CACHE_INFO).is_file():
            continue
        other = json.loads((folder / CACHE_INFO).read_text())
        for key in CACHE_KEYS_THAT_MUST_AGREE:
            if key in info and key in other and info[key] != other[key]:
                raise ValueError(
                    f"the cached latents in {folder} were made with a different {key!r} ({other[key]!r}) than "
                    f"those in {path.parent} ({info[key]!r}): a run trains on caches of one kind only"
                )
    return info


def write_cache_info(out_dir: str | os.PathLike, info: dict) -> Path:
    path = Path(out_dir) / CACHE_INFO
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path
