"""Preprocessing review: img2dataset json sizes of an image stored with its EXIF orientation.

img2dataset measures `width`/`height` and `original_width`/`original_height` with `cv2.imdecode(...,
IMREAD_UNCHANGED)`, which ignores EXIF orientation, and keeps the downloaded bytes (EXIF included) when it does not
re-encode (`skip_reencode`, `resize_mode="no"` or `resize_only_if_bigger` with a small image). Such a photo is
decoded rotated (`decode_image` applies the orientation), so its json sizes are transposed relative to the image the
model sees. The expected values here come from PIL's own `ImageOps.exif_transpose`, not from the code under test.
"""

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from skimage import data as skdata

from ldm.data.buckets import BucketDecoder, BucketTransform, make_buckets
from ldm.data.filters import SampleFilter
from ldm.data.webdataset import ImageDecoder


def _phone_photo(orientation: int) -> bytes:
    """skimage's chelsea (451 x 300, landscape pixels) as a JPEG carrying an EXIF orientation."""
    photo = Image.fromarray(skdata.chelsea())
    exif = photo.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def _shown_size(jpeg: bytes) -> tuple[int, int]:
    """(width, height) as displayed, by PIL's exif_transpose."""
    with Image.open(io.BytesIO(jpeg)) as image:
        return ImageOps.exif_transpose(image).size


def _img2dataset_json(jpeg: bytes, **extra) -> bytes:
    """The json img2dataset writes for bytes it stored as downloaded: sizes of the pixels as stored (cv2 ignores
    EXIF), stored == original."""
    with Image.open(io.BytesIO(jpeg)) as image:
        w, h = image.size
    meta = {"caption": "a cat", "width": w, "height": h, "original_width": w, "original_height": h, **extra}
    return json.dumps(meta).encode()


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_original_size_follows_the_displayed_image(orientation):
    jpeg = _phone_photo(orientation)
    shown_w, shown_h = _shown_size(jpeg)
    assert (shown_w, shown_h) == ((300, 451) if orientation >= 5 else (451, 300))
    decoder = BucketDecoder(ImageDecoder(BucketTransform(make_buckets(128, 32, 2.0), crop="center")))
    out = decoder({"__key__": "k", "jpg": jpeg, "json": _img2dataset_json(jpeg)}, random.Random(0))
    bucket_h, bucket_w = out["target_size"].tolist()
    assert out["image"].shape[1:] == (bucket_h, bucket_w)
    assert out["original_size"].tolist() == [shown_h, shown_w]  # (h, w) of what the model sees
    assert (bucket_h > bucket_w) == (shown_h > shown_w)


def test_json_sizes_already_in_the_displayed_orientation_are_kept():
    """A json written by a tool that measured the displayed image (portrait here) is not transposed again."""
    jpeg = _phone_photo(6)
    meta = json.dumps({"caption": "a cat", "original_width": 600, "original_height": 902}).encode()
    decoder = BucketDecoder(ImageDecoder(BucketTransform(make_buckets(128, 32, 2.0), crop="center")))
    out = decoder({"__key__": "k", "jpg": jpeg, "json": meta}, random.Random(0))
    assert out["original_size"].tolist() == [902, 600]


@pytest.mark.parametrize("orientation", [1, 6])
def test_size_filters_judge_the_displayed_image(orientation):
    jpeg = _phone_photo(orientation)
    shown_w, shown_h = _shown_size(jpeg)
    sample = {"__key__": "k", "jpg": jpeg, "json": _img2dataset_json(jpeg)}
    portrait_only = SampleFilter(max_aspect_ratio=1.0)
    assert portrait_only.reason_to_drop(sample, "a cat", "jpg") == (
        None if shown_w < shown_h else "filter_aspect"
    )
    tall_enough = SampleFilter(min_height=400)
    assert tall_enough.reason_to_drop(sample, "a cat", "jpg") == (None if shown_h >= 400 else "filter_size")


def test_sixteen_bit_grey_keeps_its_transparent_grey_level():
    """A 16-bit grey PNG with a tRNS grey level: its transparent pixels are composited on white, like those of an
    8-bit one (the level is a 16-bit value, lost if the image is first reduced to 8-bit "L")."""
    from ldm.data.transforms import decode_image

    grey16 = skdata.camera().astype(np.uint16) * 257
    grey16[:64] = 0  # the transparent level
    buffer = io.BytesIO()
    Image.fromarray(grey16).save(buffer, "PNG", transparency=0)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
    expected = np.where(grey16 == 0, 255, np.round(grey16 / 257)).astype(np.uint8)
    out = np.asarray(decode_image(buffer.getvalue()))
    assert out.shape == (*grey16.shape, 3)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=-1))


def test_a_rotated_png_is_turned_and_an_unrotated_one_is_not_decoded_by_the_filter(monkeypatch):
    from PIL import PngImagePlugin

    photo = Image.fromarray(skdata.chelsea())
    exif = photo.getexif()
    exif[0x0112] = 6
    rotated, plain = io.BytesIO(), io.BytesIO()
    photo.save(rotated, "PNG", exif=exif.tobytes())
    photo.save(plain, "PNG")
    meta = json.dumps(
        {"original_width": 451, "original_height": 300}
    ).encode()  # the stored pixels, as cv2 reads
    portrait_only = SampleFilter(max_aspect_ratio=1.0)
    assert _shown_size(rotated.getvalue()) == (300, 451)
    assert portrait_only.reason_to_drop({"png": rotated.getvalue(), "json": meta}, "a cat", "png") is None
    loads = []
    original_load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(
        PngImagePlugin.PngImageFile, "load", lambda self: loads.append(1) or original_load(self)
    )
    assert (
        portrait_only.reason_to_drop({"png": plain.getvalue(), "json": meta}, "a cat", "png")
        == "filter_aspect"
    )
    assert not loads  # judged from the header: Pillow's getexif() would have decoded the whole PNG


def test_a_malformed_exif_block_does_not_drop_a_decodable_photo():
    """An EXIF block with a tag of the wrong type (BitsPerSample, a SHORT tag, holding ASCII): Pillow reads the
    orientation, but ImageOps.exif_transpose fails re-writing the block. The photo is still turned as shown."""
    from ldm.data.transforms import decode_image, to_tensor

    photo = Image.fromarray(skdata.chelsea())
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "desc"  # ImageDescription, ASCII ...
    block = exif.tobytes()
    assert block[:6] == b"Exif\x00\x00" and block[6:8] == b"MM"  # big-endian entries: tag, type
    block = block.replace(b"\x01\x0e\x00\x02", b"\x01\x02\x00\x02")  # ... relabelled BitsPerSample
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=95, exif=block)
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        assert opened.getexif().get(0x0112) == 6
        expected = opened.convert("RGB").transpose(Image.Transpose.ROTATE_270)  # orientation 6
    decoded = decode_image(buffer.getvalue())
    assert decoded.size == (300, 451)
    assert torch.equal(to_tensor(decoded), to_tensor(expected))


@pytest.mark.parametrize("orientation", range(2, 9))
def test_the_fallback_turn_is_exif_transpose(orientation, monkeypatch):
    from ldm.data import transforms

    jpeg = _phone_photo(orientation)
    with Image.open(io.BytesIO(jpeg)) as opened:
        expected = transforms.to_tensor(ImageOps.exif_transpose(opened))

    def broken(image, **kwargs):
        raise ValueError("malformed EXIF")

    monkeypatch.setattr(transforms.ImageOps, "exif_transpose", broken)
    assert torch.equal(transforms.to_tensor(transforms.decode_image(jpeg)), expected)


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_caption_weights_must_be_finite(weight):
    """A NaN or infinite weight cannot be renormalised: it used to be accepted and drawn never (NaN) or, against
    its infinite weight, never too."""
    from ldm.data.captions import CaptionMix

    with pytest.raises(ValueError, match="finite"):
        CaptionMix({"txt": weight, "recap.txt": 1.0})


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
@pytest.mark.parametrize("crop", ["random", "center"])
def test_crop_coords_are_those_of_the_shown_pixels_in_the_resized_image(name, crop):
    """SDXL (sec. 2.2; diffusers' train_text_to_image_sdxl): crop_coords (top, left) in the image resized to cover
    the target. A mirrored sample reports the offset of its pixels in the mirrored resized image, resized_w −
    left − target_w (not diffusers' `image.width − x1`, taken after cropping). Checked against PIL's plain resize."""
    image = Image.fromarray(getattr(skdata, name)())
    buckets = make_buckets(128, 32, 2.0)
    for seed in range(3):
        outs = {}
        for flip in (0.0, 1.0):
            transform = BucketTransform(buckets, crop=crop, hflip_prob=flip)
            outs[flip] = (transform(image, random.Random(seed)), transform.last)
        (plain, placed), (mirrored, placed_m) = outs[0.0], outs[1.0]
        (rh, rw), (bh, bw), (top, left) = placed.resized, placed.bucket, placed.crop
        assert placed_m.resized == (rh, rw) and placed_m.crop == (top, rw - bw - left)
        resized = np.asarray(image.resize((rw, rh), Image.Resampling.BICUBIC)).astype(np.float64)
        for out, (t, lf), pixels in (
            (plain, placed.crop, resized),
            (mirrored, placed_m.crop, resized[:, ::-1]),
        ):
            got = ((out.permute(1, 2, 0).numpy() + 1) * 127.5).round()
            assert got.shape == (bh, bw, 3)
            assert np.abs(got - pixels[t : t + bh, lf : lf + bw]).mean() < 1.5
