"""Decoding and preprocessing of one image-text sample: bytes → RGB → resized, cropped tensor in [-1, 1]."""

from __future__ import annotations

import io
import json
import math
import random
import warnings
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
        raw = np.asarray(image)
        values = raw.astype(np.float32)
        if image.mode in _SIXTEEN_BIT_MODES or values.max() > 255:
            values = values / 257.0
        grey = values.round().clip(0, 255).astype(np.uint8)
        key = image.info.get("transparency")
        if isinstance(key, int):  # a tRNS grey level, in 16-bit values: kept as alpha, "L" would lose it
            image = Image.fromarray(np.stack([grey, np.where(raw == key, 0, 255).astype(np.uint8)], -1), "LA")
        else:
            image = Image.fromarray(grey, "L")
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image).round().clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class DraftGeometry:
    """Where a DCT-scaled JPEG decode sits in the full-size image: decoded x = (source x + offset x) / scale.

    libjpeg's 1/s scaling turns each s × s block of source pixels into one pixel, and an edge that is not a
    multiple of s into one whole extra pixel (ceil). After an EXIF flip that partial pixel is at the start
    of the axis, hence the offset. `decoded_size` identifies the image the geometry belongs to.
    """

    source_size: tuple[int, int]
    decoded_size: tuple[int, int]
    scale: int
    offset: tuple[int, int] = (0, 0)

    def to_decoded(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A box in full-size pixel coordinates → the same box in the decoded image, clipped to it."""
        (ox, oy), (w, h), s = self.offset, self.decoded_size, self.scale
        left, top, right, bottom = box
        return (
            max(0.0, (left + ox) / s),
            max(0.0, (top + oy) / s),
            min(float(w), (right + ox) / s),
            min(float(h), (bottom + oy) / s),
        )


DRAFT_INFO = "ldm.draft_geometry"  # key of `Image.info` under which decode_image records a DraftGeometry
_DCT_SCALES = (8, 4, 2)
_ORIENTATION = 0x0112
# EXIF orientation → (axes swapped, x reversed, y reversed), all in the output image's axes
_ORIENTATIONS = {
    2: (False, True, False),
    3: (False, True, True),
    4: (False, False, True),
    5: (True, False, False),
    6: (True, True, False),
    7: (True, True, True),
    8: (True, False, True),
}
# EXIF orientation → the transpose that shows the image upright (as ImageOps.exif_transpose does)
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as shown, its EXIF orientation applied (from the header alone)."""
    swapped = _ORIENTATIONS.get(image.getexif().get(_ORIENTATION, 1), (False,))[0]
    return image.size[::-1] if swapped else image.size


def as_displayed(size: tuple[int, int], image: Image.Image) -> tuple[int, int]:
    """A (width, height) from the json → in the orientation `image` is shown (and decoded) in.

    img2dataset measures its json sizes with cv2's IMREAD_UNCHANGED, which ignores EXIF orientation, and keeps the
    downloaded bytes (EXIF included) when it does not re-encode: for a rotated photo those sizes are transposed.
    They are swapped when they are landscape/portrait like the stored pixels and unlike the displayed image; a size
    already measured as displayed (or an unrotated image) is returned as it is. A PNG without an eXIf chunk before
    its pixel data counts as unrotated: Pillow's getexif() would decode the whole image to look further.
    """
    if image.format == "PNG" and "exif" not in image.info:
        return size
    stored, shown = image.size, displayed_size(image)
    width, height = size
    if (
        shown != stored
        and stored[0] != stored[1]
        and width != height
        and (width > height) == (stored[0] > stored[1])
    ):
        return height, width
    return size


def draft_geometry(image: Image.Image) -> DraftGeometry | None:
    """The DraftGeometry decode_image recorded for `image`, or None: not DCT-scaled, or since resized/cropped."""
    geometry = image.info.get(DRAFT_INFO)
    if isinstance(geometry, DraftGeometry) and geometry.decoded_size == image.size:
        return geometry
    return None


def source_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the full-size image, in its displayed orientation, even after a DCT-scaled decode."""
    geometry = draft_geometry(image)
    return geometry.source_size if geometry is not None else image.size


def _draft(image: Image.Image, min_size: int) -> int:
    """Ask libjpeg for the largest 1/s reduction (s in 8, 4, 2) whose shorter side stays ≥ min_size; → s."""
    width, height = image.size
    scale = next((s for s in _DCT_SCALES if s * min_size <= min(width, height)), 1)
    if scale == 1:
        return 1
    drafted = image.draft(None, (width // scale, height // scale))
    return 1 if drafted is None else round(width / drafted[1][2])


def decode_image(data: bytes, min_size: int | None = None, exif_transpose: bool = True) -> Image.Image:
    """Decode image bytes to RGB, fully loaded. Raises SampleError("decode_error", ...) on any failure.

    With `min_size`, a JPEG is decoded at the smallest power-of-two reduction whose shorter side is still
    ≥ min_size (libjpeg DCT scaling): a 4000 px photo headed for 256 px decodes several times faster.
    The reduction is recorded as a `DraftGeometry` in `image.info[DRAFT_INFO]`; `source_size(image)` gives
    the full size and `ImageTransform` crops in full-size coordinates, so the output matches a full decode.
    """
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size  # the full size: draft() changes image.size
        scale = 1
        if min_size is not None and image.format == "JPEG":
            scale = _draft(image, min_size)
        image.load()
        decoded = image.size
        swapped, x_reversed, y_reversed = False, False, False
        if exif_transpose:
            orientation = image.getexif().get(_ORIENTATION, 1)
            if orientation in _ORIENTATIONS:  # exif_transpose also copies untagged images: skip those
                swapped, x_reversed, y_reversed = _ORIENTATIONS[orientation]
                try:
                    image = ImageOps.exif_transpose(image)
                except Exception:  # it re-writes the EXIF block and fails on a malformed tag: turn the pixels
                    image = image.transpose(_TRANSPOSES[orientation])
        image = to_rgb(image)
        if scale > 1:
            if swapped:
                (width, height), decoded = (height, width), decoded[::-1]
            image.info[DRAFT_INFO] = DraftGeometry(
                source_size=(width, height),
                decoded_size=decoded,
                scale=scale,
                offset=(
                    decoded[0] * scale - width if x_reversed else 0,
                    decoded[1] * scale - height if y_reversed else 0,
                ),
            )
        return image
    except (
        Exception
    ) as exn:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        raise SampleError("decode_error", f"{type(exn).__name__}: {exn}") from exn


def decode_text(value: bytes | str, name: str = "txt") -> str:
    """A text member (bytes or str) as stripped UTF-8; SampleError("bad_caption") when it is not UTF-8."""
    if isinstance(value, str):
        return value.strip()
    try:
        return bytes(value).decode("utf-8-sig").strip()
    except UnicodeDecodeError as exn:
        raise SampleError("bad_caption", f"{name} is not UTF-8: {exn}") from exn


def parse_json_member(data: bytes | str):
    """A sample's json member, parsed; SampleError("bad_caption") when it does not parse."""
    try:
        return json.loads(data)
    except ValueError as exn:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SampleError("bad_caption", f"json does not parse: {exn}") from exn


def decode_caption(sample: dict) -> str:
    """Caption from `txt` (UTF-8, stripped), else the `caption` field of `json`, else "" (the null prompt)."""
    if "txt" in sample:
        return decode_text(sample["txt"])
    if "json" in sample:
        meta = parse_json_member(sample["json"])
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if caption is None:
            return ""
        if not isinstance(caption, str):
            raise SampleError("bad_caption", f"json caption is a {type(caption).__name__}")
        return caption.strip()
    return ""


_UNIT = np.float32(1 / 127.5)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 (3, H, W) in [-1, 1], contiguous and writable.

    Each channel goes from PIL's plane straight into its slice of the output (one uint8 → float32 pass),
    with no intermediate (H, W, 3) copy and no strided permute.
    """
    out = np.empty((3, image.height, image.width), dtype=np.float32)
    for plane, channel in zip(out, image.split(), strict=True):
        np.multiply(np.asarray(channel), _UNIT, out=plane, dtype=np.float32)
    out -= 1.0
    return torch.from_numpy(out)


# PIL filter → (torch's antialiased interpolation mode, the filter's support in output pixels): the same filters
# and windows as PIL's resize (torchvision's PIL-compatible port), vectorised, with a uint8 path; a few times
# faster on one core.
_TORCH_FILTERS = {
    Image.Resampling.BICUBIC: ("bicubic", 2.0),
    Image.Resampling.BILINEAR: ("bilinear", 1.0),
}


def _uint8_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → (H, W, 3) uint8 tensor, one copy. Read-only: torch warns, but it is never written to."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image))


def _resize_crop_torch(
    image: Image.Image,
    box: tuple[float, float, float, float],
    size: tuple[int, int],
    resample: Image.Resampling,
) -> torch.Tensor | None:
    """`image.resize(size, resample, box=box)` as a (3, h, w) uint8 tensor (size = (w, h)), by torch's
    antialiased `interpolate`; None if the box does not start at a whole output pixel (then only PIL can do it
    exactly).

    torch's `interpolate` has no box: output pixel i samples the input at (i + 0.5) × scale. The box's scale
    is given explicitly and the output begins at pixel 0, so pixel `left / scale` (a whole number for every
    crop box made here) is the box's first; the rows and columns before it are computed and dropped. The input
    is cut past the last filter window only, which changes nothing.
    """
    mode, support = _TORCH_FILTERS[resample]
    (width, height), (left, top, right, bottom) = size, box
    sx, sy = (right - left) / width, (bottom - top) / height
    i0, j0 = round(left / sx), round(top / sy)
    if abs(left / sx - i0) > 1e-3 or abs(top / sy - j0) > 1e-3:
        return None
    cut_x = min(image.width, math.ceil(right + support * max(sx, 1.0)) + 1)
    cut_y = min(image.height, math.ceil(bottom + support * max(sy, 1.0)) + 1)
    pixels = _uint8_pixels(image)[:cut_y, :cut_x].permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w), channels-last
    out = torch.nn.functional.interpolate(
        pixels,
        scale_factor=(1 / sy, 1 / sx),
        mode=mode,
        antialias=True,
        align_corners=False,
        recompute_scale_factor=False,  # the box's scale maps the coordinates, not the rounded output size
    )
    if out.shape[-2] < j0 + height or out.shape[-1] < i0 + width:
        return None  # the image ends at the box's edge and the output size rounded down
    return out[0, :, j0 : j0 + height, i0 : i0 + width]


def resize_crop(
    image: Image.Image,
    box: tuple[float, float, float, float],
    size: tuple[int, int],
    resample: Image.Resampling = Image.Resampling.BICUBIC,
    flip: bool = False,
) -> torch.Tensor:
    """The `box` of `image` (given in full-size source pixels for an image `decode_image` DCT-scaled) resized to
    `size` = (w, h) in one antialiased pass, optionally mirrored → (3, h, w) float in [-1, 1]."""
    geometry = draft_geometry(image)
    if geometry is not None:
        box = geometry.to_decoded(box)
    if box == (0.0, 0.0, float(image.width), float(image.height)) and image.size == tuple(size):
        out = image
    else:
        if image.mode == "RGB" and resample in _TORCH_FILTERS:
            pixels = _resize_crop_torch(image, box, size, resample)
            if pixels is not None:
                return _unit_range(pixels.flip(-1) if flip else pixels)
        out = image.resize(tuple(size), resample, box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(out)


def _unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 (any strides) → contiguous float32 in [-1, 1]."""
    out = torch.empty(pixels.shape, dtype=torch.float32)
    out.copy_(pixels)
    return out.mul_(1 / 127.5).sub_(1.0)


@dataclass
class ImageTransform:
    """Resize the shorter side to `resolution`, crop a square, optionally flip; → (3, R, R) in [-1, 1].

    Resizing and cropping are one resampling pass over the crop's neighbourhood, antialiased by `resample`'s
    support scaled to the reduction: PIL's `resize(box=...)`, computed by torch's equivalent uint8 kernel for
    BICUBIC and BILINEAR (within a grey level of PIL's, several times faster). An image from
    `decode_image(min_size=)` is cropped in its full-size coordinates (`DraftGeometry`), so its output and
    its random crops are those of a full decode. Horizontal flips are off by default: they contradict
    captions that say "left" or "right".
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
        box = self.crop_box(*source_size(image), rng)
        flip = self.hflip_prob > 0 and rng.random() < self.hflip_prob
        return resize_crop(image, box, (self.resolution, self.resolution), self.resample, flip)
