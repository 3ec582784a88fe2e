"""Fast decode path (DCT-scaled JPEG decode + one torch resize/crop pass) against a plain full decode."""

import functools
import importlib.util
import io
import math
import random
import sys

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from ldm.data.transforms import (
    DRAFT_INFO,
    ImageTransform,
    decode_image,
    draft_geometry,
    source_size,
    to_tensor,
)
from tests.helpers import ROOT

# EXIF orientation → the transposition that displays the stored image upright (EXIF 2.3, tag 0x0112)
UPRIGHT = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.ROTATE_90, Image.Transpose.FLIP_TOP_BOTTOM],
    6: [Image.Transpose.ROTATE_270],
    7: [Image.Transpose.ROTATE_90, Image.Transpose.FLIP_LEFT_RIGHT],
    8: [Image.Transpose.ROTATE_90],
}


@functools.cache
def _photo_jpeg(name: str, size: tuple[int, int], orientation: int = 1) -> bytes:
    """A real photo resized to `size` (odd sizes: edges that are not whole DCT blocks), as JPEG q92."""
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    image = image.resize(size, Image.Resampling.BICUBIC)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92, exif=exif)
    return buf.getvalue()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two [-1, 1] tensors on the 0-255 scale."""
    mse = float(((a - b) * 127.5).pow(2).mean())
    return 10 * math.log10(255**2 / max(mse, 1e-10))


def _plain_center_crop(image: Image.Image, resolution: int) -> torch.Tensor:
    """The textbook path: resize the whole image (shorter side → R), then cut the centre square."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    pixels = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    return torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)


SIZES = [
    ("astronaut", (1001, 677)),
    ("coffee", (677, 1003)),
    ("rocket", (1600, 901)),
    ("chelsea", (517, 1203)),
]


@pytest.mark.parametrize("resolution", [64, 160])
@pytest.mark.parametrize(("name", "size"), SIZES)
def test_fast_path_matches_full_decode(name, size, resolution):
    data = _photo_jpeg(name, size)
    fast_image = decode_image(data, min_size=resolution)
    geometry = draft_geometry(fast_image)
    assert geometry is not None and geometry.scale >= 2  # the fast path really was taken
    assert source_size(fast_image) == size
    full_image = decode_image(data)
    assert full_image.size == size and draft_geometry(full_image) is None

    # centre crop: against the textbook resize-then-crop of the full decode
    fast = ImageTransform(resolution, crop="center")(fast_image)
    assert fast.shape == (3, resolution, resolution) and fast.dtype == torch.float32
    assert _psnr(fast, _plain_center_crop(full_image, resolution)) > 35
    # random crops are drawn in full-size coordinates: the same seed gives the same crop as a full decode
    for seed in range(3):
        transform = ImageTransform(resolution, crop="random")
        fast = transform(fast_image, random.Random(seed))
        full = transform(full_image, random.Random(seed))
        assert _psnr(fast, full) > 35


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_honoured(orientation):
    size, resolution = (1001, 677), 64
    data = _photo_jpeg("astronaut", size, orientation)
    stored = decode_image(data, exif_transpose=False)
    upright = stored
    for step in UPRIGHT.get(orientation, []):
        upright = upright.transpose(step)
    full = decode_image(data)
    assert np.array_equal(np.asarray(full), np.asarray(upright))

    fast_image = decode_image(data, min_size=resolution)
    expected_size = size[::-1] if orientation >= 5 else size
    assert source_size(fast_image) == expected_size
    assert (fast_image.width > fast_image.height) == (expected_size[0] > expected_size[1])
    fast = ImageTransform(resolution, crop="center")(fast_image)
    assert _psnr(fast, _plain_center_crop(upright, resolution)) > 35


@pytest.mark.parametrize("min_size", [64, 100, 256])
def test_draft_never_decodes_below_the_target(min_size):
    sizes = [
        (90, 300),
        (255, 256),
        (511, 700),
        (512, 512),
        (1023, 2100),
        (1024, 1030),
        (3000, 2047),
        (4096, 2048),
    ]
    for width, height in sizes:
        buf = io.BytesIO()
        Image.new("RGB", (width, height), (120, 40, 200)).save(buf, format="JPEG")
        image = decode_image(buf.getvalue(), min_size=min_size)
        geometry = draft_geometry(image)
        scale = geometry.scale if geometry else 1
        short = min(width, height)
        assert source_size(image) == (width, height)
        assert image.size == (math.ceil(width / scale), math.ceil(height / scale))
        # the decoded content (not just the pixel count, which rounds up) keeps the shorter side ≥ target ...
        assert short / scale >= min(min_size, short)
        # ... and the reduction is the largest libjpeg offers that does so
        assert scale == 8 or short / (2 * scale) < min_size


def test_non_jpeg_images_are_unchanged():
    photo = Image.fromarray(skimage.data.coffee())  # 600 × 400
    for fmt in ("PNG", "WEBP"):
        buf = io.BytesIO()
        photo.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        image = decode_image(buf.getvalue(), min_size=64)
        assert image.size == photo.size and DRAFT_INFO not in image.info
        assert np.array_equal(np.asarray(image), np.asarray(photo))


@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
@pytest.mark.parametrize("size", [(600, 400), (333, 517), (70, 50), (2000, 1100)])
def test_torch_resize_matches_pil(size, resample):
    """ImageTransform's torch kernel against PIL's own resize(box=...): within one grey level."""
    image = Image.fromarray(skimage.data.astronaut()).resize(size, Image.Resampling.BICUBIC)
    for crop, seed in (("center", 0), ("random", 1), ("random", 2)):
        transform = ImageTransform(96, crop=crop, resample=resample)
        box = transform.crop_box(image.width, image.height, random.Random(seed))
        expected = to_tensor(image.resize((96, 96), resample, box=box))
        got = transform(image, random.Random(seed))
        assert (got - expected).abs().max() <= 1.01 / 127.5
        assert got.is_contiguous() and got.dtype == torch.float32
    # filters torch does not have go through PIL, exactly
    lanczos = ImageTransform(96, crop="center", resample=Image.Resampling.LANCZOS)
    box = lanczos.crop_box(*image.size, random.Random())
    assert torch.equal(lanczos(image), to_tensor(image.resize((96, 96), Image.Resampling.LANCZOS, box=box)))


def test_to_tensor_is_exact_and_writable():
    pixels = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    tensor = to_tensor(Image.fromarray(pixels))
    expected = torch.from_numpy(pixels.astype(np.float64) / 127.5 - 1).permute(2, 0, 1).float()
    assert tensor.shape == (3, 37, 53) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    assert torch.allclose(tensor, expected, atol=1e-6, rtol=0)
    tensor.add_(1)  # writable, not a view of PIL's memory


def test_geometry_is_dropped_once_the_image_changes():
    image = decode_image(_photo_jpeg("astronaut", (1001, 677)), min_size=64)
    assert draft_geometry(image) is not None
    cropped = image.crop((10, 5, 110, 80))  # PIL copies `info`: the geometry must not apply any more
    assert DRAFT_INFO in cropped.info and draft_geometry(cropped) is None
    assert source_size(cropped) == (100, 75)
    transform = ImageTransform(32, crop="center")
    box = transform.crop_box(100, 75, random.Random())
    expected = to_tensor(cropped.resize((32, 32), Image.Resampling.BICUBIC, box=box))
    assert (transform(cropped) - expected).abs().max() <= 1.01 / 127.5


def test_loader_bench_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_loader", ROOT / "bench" / "loader.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_loader"] = bench
    spec.loader.exec_module(bench)
    result = bench.run(images=4, resolutions=[64], rounds=1, work=tmp_path, sizes=(120, 300))
    assert [r["pipeline"] for r in result["rows"]] == list(bench.PIPELINES)
    assert all(r["images_per_cpu_s"] > 0 and r["images_per_wall_s"] > 0 for r in result["rows"])
    assert result["fidelity_vs_plain"]["64"]["ldm"]["psnr_db"] > 35
    table = bench.markdown(result)
    assert table.count("\n| 64 |") == len(bench.PIPELINES)
