"""Decoding and preprocessing of one image-text sample: bytes → RGB → resized, cropped tensor in [-1, 1]."""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

CROPS = ("random", "center")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class SampleError(Exception):
    """A sample that cannot be used; `reason` names the kind of damage for the skip counters."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode → RGB. Transparency is composited on `background`; 16-bit greys are scaled, not clipped."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image).astype(np.float32)
        if image.mode in _SIXTEEN_BIT_MODES or values.max() > 255:
            values = values / 257.0
        image = Image.fromarray(values.round().clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image).round().clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, min_size: int | None = None, exif_transpose: bool = True) -> Image.Image:
    """Decode image bytes to RGB, fully loaded. Raises SampleError("decode_error", ...) on any failure.

    With `min_size`, a JPEG is decoded at the smallest power-of-two reduction whose shorter side is still
    ≥ min_size (libjpeg DCT scaling): a 4000 px photo headed for 256 px decodes several times faster.
    """
    try:
        image = Image.open(io.BytesIO(data))
        if min_size is not None and image.format == "JPEG":
            scale = min_size / min(image.size)
            if scale < 1:
                image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image.load()
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (
        Exception
    ) as exn:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        raise SampleError("decode_error", f"{type(exn).__name__}: {exn}") from exn


def decode_caption(sample: dict) -> str:
    """Caption from `txt` (UTF-8, stripped), else the `caption` field of `json`, else "" (the null prompt)."""
    if "txt" in sample:
        text = sample["txt"]
        if isinstance(text, str):
            return text.strip()
        try:
            return text.decode("utf-8-sig").strip()
        except UnicodeDecodeError as exn:
            raise SampleError("bad_caption", f"txt is not UTF-8: {exn}") from exn
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as exn:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise SampleError("bad_caption", f"json does not parse: {exn}") from exn
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if caption is None:
            return ""
        if not isinstance(caption, str):
            raise SampleError("bad_caption", f"json caption is a {type(caption).__name__}")
        return caption.strip()
    return ""


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 (3, H, W) in [-1, 1]."""
    array = np.array(image, dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()


@dataclass
class ImageTransform:
    """Resize the shorter side to `resolution`, crop a square, optionally flip; → (3, R, R) in [-1, 1].

    Resizing and cropping are one resampling pass (PIL's `resize(box=...)` reads only the crop's
    neighbourhood), antialiased by `resample`'s support scaled to the reduction. Horizontal flips are off
    by default: they contradict captions that say "left" or "right".
    """

    resolution: int
    crop: str = "random"
    hflip_prob: float = 0.0
    resample: Image.Resampling = Image.Resampling.BICUBIC

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[float, float, float, float]:
        """The square, in source pixels, that becomes the output."""
        scale = self.resolution / min(width, height)
        resized = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        spare_x, spare_y = resized[0] - self.resolution, resized[1] - self.resolution
        if self.crop == "random":
            left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
        else:
            left, top = spare_x // 2, spare_y // 2
        sx, sy = width / resized[0], height / resized[1]
        return (left * sx, top * sy, (left + self.resolution) * sx, (top + self.resolution) * sy)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng if rng is not None else random.Random()
        box = self.crop_box(image.width, image.height, rng)
        size = (self.resolution, self.resolution)
        if box == (0.0, 0.0, float(image.width), float(image.height)) and image.size == size:
            out = image
        else:
            out = image.resize(size, self.resample, box=box)
        if self.hflip_prob > 0 and rng.random() < self.hflip_prob:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(out)
