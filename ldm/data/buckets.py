"""Aspect-ratio buckets (NovelAI 2022, SDXL: Podell et al. 2023, sec. 2.3): train on whole images, not square crops.

A bucket is a size (h, w), both multiples of `step`, with h·w ≤ base² and as large as that allows (the area stays
close to base²). Each image goes to the bucket nearest its aspect ratio (in log ratio), is scaled so it just
covers the bucket and the excess is cropped (random or centre), so at most a sliver of one side is lost. `step`
must be a multiple of the total downsampling of the autoencoder and the UNet (8 × 8 = 64 px for SD's f8
autoencoder and 4-level UNet), so every bucket is a valid latent size.

Batching (`ldm.data.stream.ShardStream`): every batch holds samples of one size. Each worker keeps a queue per
size; a sample joins the queue of its bucket and a batch is the first queue to fill, so batches come in data
order and in proportion to the buckets' shares of the data.

Exact resume. A worker's position is (round, raw samples read); with buckets, samples read before that position
may still wait in partly filled queues when a checkpoint is written. The position saved with each batch is
therefore the read head *plus* the (round, index) of every sample still waiting: at most
num_buckets × (batch_size − 1) pairs, whatever the data. A resumed worker re-reads the tar bytes up to the
read head as before, decoding only the waiting samples (a sample's decoding and crop depend only on its seed,
round and index, so it decodes to the same tensor and the same bucket) and putting them back in their queues
in read order; a waiting sample of an earlier round (resampled streams carry queues across rounds) has that
round re-read too. The queues are then exactly those of the uninterrupted stream, and so are all later batches.
The alternative, saving the position of the oldest waiting sample and the set of samples emitted since, grows
without bound behind a rare bucket.

Micro-conditioning (SDXL sec. 2.2): each bucketed sample carries `original_size` (h, w) of the image before any
resizing (img2dataset's `original_height` / `original_width` when the json has them, else the stored image's
size), `crop_coords` (top, left) cropped from the resized image, and `target_size`, the bucket (h, w).
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from ldm.data.transforms import CROPS, as_displayed, displayed_size, resize_crop, source_size

Size = tuple[int, int]  # (height, width)
MICRO_KEYS = ("original_size", "crop_coords", "target_size")  # what a bucketed sample carries, (2,) each


def make_buckets(base: int = 256, step: int = 64, max_ratio: float = 2.0) -> list[Size]:
    """Bucket sizes (h, w), sorted by aspect ratio w / h: for each width w a multiple of `step`, the largest
    height h, a multiple of `step`, with h·w ≤ base², and the transposes; those with max(h, w) / min(h, w) >
    `max_ratio` are left out. base 256, step 64, max_ratio 2 → (320, 192), (256, 256), (192, 320)."""
    if base <= 0 or step <= 0 or step > base:
        raise ValueError(f"need 0 < step <= base, got base={base}, step={step}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    area = base * base
    sizes: set[Size] = set()
    for w in range(step, area // step + 1, step):
        h = area // w // step * step
        if h >= step and max(h, w) / min(h, w) <= max_ratio:
            sizes.update({(h, w), (w, h)})
    return sorted(sizes, key=lambda hw: (hw[1] / hw[0], hw[1]))


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's in log ratio (|log(w/h) − log(bw/bh)|); of two at the
    same distance, the first in `buckets`."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    log_ratio = math.log(width / height)
    return min(buckets, key=lambda hw: abs(log_ratio - math.log(hw[1] / hw[0])))


@dataclass(frozen=True)
class BucketSpec:
    """What `data.buckets` holds: `make_buckets`'s arguments; `base` null → the data resolution."""

    step: int = 64
    max_ratio: float = 2.0
    base: int | None = None

    @classmethod
    def of(cls, value: BucketSpec | Mapping | None) -> BucketSpec | None:
        if value is None or isinstance(value, BucketSpec):
            return value
        unknown = set(value) - {"step", "max_ratio", "base"}
        if unknown:
            raise ValueError(f"data.buckets: unknown keys {sorted(unknown)}; accepted: step, max_ratio, base")
        return cls(**{k: value[k] for k in value})

    def sizes(self, resolution: int) -> list[Size]:
        return make_buckets(self.base or resolution, self.step, self.max_ratio)


@dataclass(frozen=True)
class BucketCrop:
    """Where an image of `size` goes: `bucket` (h, w); the image is resized to `resized` (h, w) and cropped at
    `crop` (top, left) of the resized image; `box` is that crop in source pixels (left, top, right, bottom)."""

    size: Size
    bucket: Size
    resized: Size
    crop: Size
    box: tuple[float, float, float, float]

    def mirrored(self) -> BucketCrop:
        """The placement of the mirrored output: the same pixels, their left edge now counted from the right."""
        top, left = self.crop
        return replace(self, crop=(top, self.resized[1] - self.bucket[1] - left))


class BucketTransform:
    """PIL image → (3, h, w) tensor in [-1, 1] at the nearest bucket, resized once (scaled to cover, then cropped).

    Used as an `ImageDecoder` transform: `resolution` (the base side) is the smallest side JPEG draft decoding may
    reduce an image to, which is enough to cover any nearest bucket without upscaling (a bucket's short side is at
    most base and its long side at most base · sqrt(ratio)). The placement of the latest call is kept in `last`
    for `BucketDecoder` (each DataLoader worker has its own copy). Horizontal flips are off by default, as in
    `ImageTransform`: they contradict captions that say "left" or "right" (captions are not rewritten).
    """

    def __init__(
        self,
        buckets: Sequence[Size],
        crop: str = "random",
        hflip_prob: float = 0.0,
        resample: Image.Resampling = Image.Resampling.BICUBIC,
    ):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if not buckets:
            raise ValueError("no buckets")
        self.buckets = [(int(h), int(w)) for h, w in buckets]
        self.crop, self.hflip_prob, self.resample = crop, hflip_prob, resample
        self.resolution = max(min(hw) for hw in self.buckets)
        self.last: BucketCrop | None = None

    @classmethod
    def from_spec(
        cls, spec: BucketSpec | Mapping, resolution: int, crop: str = "random", hflip_prob: float = 0.0
    ) -> BucketTransform:
        """The transform of `data.buckets` (a `BucketSpec` or its mapping) at data resolution `resolution`."""
        return cls(BucketSpec.of(spec).sizes(resolution), crop=crop, hflip_prob=hflip_prob)

    def place(self, width: int, height: int, rng: random.Random) -> BucketCrop:
        bh, bw = nearest_bucket(width, height, self.buckets)
        scale = max(bh / height, bw / width)
        rh, rw = max(bh, round(height * scale)), max(bw, round(width * scale))
        if self.crop == "random":
            top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
        else:
            top, left = (rh - bh) // 2, (rw - bw) // 2
        sy, sx = height / rh, width / rw
        box = (left * sx, top * sy, (left + bw) * sx, (top + bh) * sy)
        return BucketCrop((height, width), (bh, bw), (rh, rw), (top, left), box)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng if rng is not None else random.Random()
        placed = self.place(*source_size(image), rng)  # full-size coordinates, even after a DCT-scaled decode
        bh, bw = placed.bucket
        flip = self.hflip_prob > 0 and rng.random() < self.hflip_prob
        out = resize_crop(image, placed.box, (bw, bh), self.resample, flip)
        # a flipped image shows the mirror image of the crop taken
        self.last = placed.mirrored() if flip else placed
        return out


class BucketDecoder:
    """An `ImageDecoder` whose transform is a `BucketTransform`, plus the micro-conditioning of each sample:
    raw sample → {"image": (3, h, w), "caption", "key", "original_size", "crop_coords", "target_size"}
    (the last three LongTensors (2,), (h, w) / (top, left) order). Whatever the wrapped decoder checks or
    filters, it still does. `mirror`: also "crop_coords_flip", the crop coordinates of the image mirrored
    (`image.flip(-1)`), for a latent cache that stores both orientations."""

    def __init__(self, decoder, mirror: bool = False):
        if not isinstance(decoder.transform, BucketTransform):
            raise TypeError(
                f"BucketDecoder needs a decoder with a BucketTransform, not {decoder.transform!r}"
            )
        self.decoder, self.transform, self.mirror = decoder, decoder.transform, mirror

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        self.transform.last = None
        out = self.decoder(sample, rng)
        placed = self.transform.last
        if placed is None:
            raise RuntimeError("the wrapped decoder did not call its BucketTransform")
        original = _original_size(sample, self.decoder.image_keys) or placed.size
        for name, value in zip(MICRO_KEYS, (original, placed.crop, placed.bucket), strict=True):
            out[name] = torch.tensor(value, dtype=torch.long)
        if self.mirror:
            out["crop_coords_flip"] = torch.tensor(placed.mirrored().crop, dtype=torch.long)
        return out


def _original_size(sample: dict, image_keys: Sequence[str]) -> Size | None:
    """(h, w) before any resizing, as the image is shown: img2dataset's json original_height / original_width
    (transposed for an EXIF-rotated image: `as_displayed`), else the stored image's header (EXIF rotation applied),
    read without decoding; None if neither can be read."""
    original = None
    try:
        meta = json.loads(sample["json"]) if "json" in sample else None
        h, w = meta.get("original_height"), meta.get("original_width")
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            original = (w, h)
    except Exception:  # a caption-less or odd json is the caption decoder's business, not ours
        pass
    key = next((k for k in image_keys if k in sample), None)
    try:
        with Image.open(io.BytesIO(sample[key])) as image:
            w, h = displayed_size(image) if original is None else as_displayed(original, image)
            return h, w
    except Exception:
        return None if original is None else original[::-1]
