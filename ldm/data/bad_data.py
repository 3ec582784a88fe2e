"""A corpus of damaged and odd image-text shards, for testing a loader against what web-scale data holds.

    python -m ldm.data.bad_data --out /tmp/bad-shards     # then point data.train_urls at it

`write_bad_data_shards` writes, in img2dataset's layout:

    bad-000000.tar  good samples, interleaved with one sample of each kind below
    bad-000001.tar  good samples, then a sample cut off mid-image (a truncated tar)
    bad-000002.tar  zero bytes (a failed download)
    bad-000003.tar  random bytes (not a tar)
    bad-000004.tar  good samples, then a sample cut off on a block boundary: its image whole, its caption gone

and returns what a correct loader must make of them: the skips per reason, the keys that must come through
(odd but valid formats among them: converted, not dropped), their captions, and the colour each odd image
decodes to.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BOMB_SIDE = 30000  # 9e8 pixels declared: over PIL's DecompressionBombError limit (2 × MAX_IMAGE_PIXELS)


@dataclass
class BadDataCorpus:
    urls: list[str]  # the shards, in order
    expected_skips: dict[str, int]  # per skip reason, for one pass over all shards
    kept: dict[str, str]  # key → caption, for every sample a loader must deliver
    colors: dict[str, tuple[int, int, int]]  # key → the RGB every pixel of that (solid) odd image decodes to


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A PNG whose header declares side × side RGB pixels, with no pixel data (a few dozen bytes)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no filter, no interlace
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")


def jpeg_bomb(side: int = BOMB_SIDE) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to declare side × side pixels."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), (20, 120, 20)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)  # marker, length (2), precision (1), then H, W
    return bytes(data)


def _photo(rng: np.random.Generator, size=(40, 30)) -> Image.Image:
    """A smooth random colour field (JPEG-friendly, with something for an autoencoder to learn)."""
    coarse = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def _palette_image(color: tuple[int, int, int], transparent: bool) -> Image.Image:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, *color] + [0] * (256 - 2) * 3)
    if transparent:
        image.info["transparency"] = 1
    return image


@dataclass
class Case:
    key: str
    members: dict[str, bytes]
    skip: str | None = None  # the skip reason a loader must count it under; None: it must come through
    caption: str = ""  # what it must come through with
    color: tuple[int, int, int] | None = None  # the RGB every pixel decodes to (solid images)


def odd_cases() -> list[Case]:
    """One sample of each kind of damage, and of each odd but valid format."""
    photo = _encode(_photo(np.random.default_rng(1)), "JPEG", quality=90)
    cmyk_red = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 128))  # half-transparent blue: composited over white
    grey16 = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))  # mode I;16: 40000 / 257 → 156
    palette, palette_alpha = _palette_image((10, 20, 200), False), _palette_image((10, 20, 200), True)
    return [
        Case("corrupt_jpeg", {"jpg": photo[: len(photo) // 2], "txt": b"truncated"}, skip="decode_error"),
        Case("garbage_jpeg", {"jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4}, skip="decode_error"),
        Case("png_bomb", {"png": png_bomb(), "txt": b"decompression bomb"}, skip="decode_error"),
        Case("jpeg_bomb", {"jpg": jpeg_bomb(), "txt": b"decompression bomb"}, skip="decode_error"),
        Case("missing_image", {"txt": b"a caption without its image", "json": b"{}"}, skip="missing_image"),
        Case(
            "non_utf8_caption", {"jpg": photo, "txt": "café".encode("latin-1") + b"\xff"}, skip="bad_caption"
        ),
        Case("bad_json_only", {"jpg": photo, "json": b'{"caption": "unterminated'}, skip="bad_caption"),
        Case(
            "bad_json_with_txt", {"jpg": photo, "txt": b"from txt", "json": b"{not json"}, caption="from txt"
        ),
        Case("no_caption_in_json", {"jpg": photo, "json": b'{"status": "success"}'}),
        Case("image_only", {"jpg": photo}),
        Case("empty_caption", {"jpg": photo, "txt": b"  \n"}),
        Case(
            "cmyk_jpeg",
            {"jpg": _encode(cmyk_red, "JPEG", quality=95), "txt": b"cmyk"},
            caption="cmyk",
            color=(255, 0, 0),
        ),
        Case(
            "rgba_png", {"png": _encode(rgba, "PNG"), "txt": b"rgba"}, caption="rgba", color=(127, 127, 255)
        ),
        Case(
            "grey16_png", {"png": _encode(grey16, "PNG"), "txt": b"i16"}, caption="i16", color=(156, 156, 156)
        ),
        Case("palette_png", {"png": _encode(palette, "PNG"), "txt": b"p"}, caption="p", color=(10, 20, 200)),
        Case(
            "palette_alpha_png",
            {"png": _encode(palette_alpha, "PNG"), "txt": b"pa"},
            caption="pa",
            color=(255, 255, 255),
        ),
        Case(
            "grey_jpeg",
            {"jpg": _encode(Image.new("L", (8, 8), 90), "JPEG", quality=95), "txt": b"l"},
            caption="l",
            color=(90, 90, 90),
        ),
        Case(
            "one_pixel_png",
            {"png": _encode(Image.new("RGB", (1, 1), (200, 100, 50)), "PNG"), "txt": b"1"},
            caption="1",
            color=(200, 100, 50),
        ),
    ]


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def _good(key: str, rng: np.random.Generator) -> tuple[str, dict[str, bytes], str]:
    caption = f"a smooth colour field number {key[-3:]}"
    meta = {"key": key, "caption": caption, "status": "success", "width": 40, "height": 30}
    members = {
        "jpg": _encode(_photo(rng), "JPEG", quality=90),
        "txt": caption.encode(),
        "json": json.dumps(meta).encode(),
    }
    return key, members, caption


def write_bad_data_shards(
    out_dir: str | Path, good_per_shard: tuple[int, int, int] = (8, 5, 8)
) -> BadDataCorpus:
    """Write the corpus into `out_dir` (see the module docstring); `good_per_shard`: the good samples of shards
    0, 1 and 4. With the defaults 32 samples come through: 8 good and 11 odd ones from shard 0, 5 and 8 good
    ones from the truncated shards."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    kept: dict[str, str] = {}
    colors: dict[str, tuple[int, int, int]] = {}

    cases = odd_cases()
    good = [_good(f"good_0_{i:03d}", rng) for i in range(good_per_shard[0])]
    first: list[tuple[str, dict[str, bytes]]] = []
    skips: dict[str, int] = {}
    for i in range(max(len(cases), len(good))):  # interleaved: damage sits between good samples
        if i < len(good):
            first.append(good[i][:2])
            kept[good[i][0]] = good[i][2]
        if i < len(cases):
            case = cases[i]
            first.append((case.key, case.members))
            if case.skip is not None:
                skips[case.skip] = skips.get(case.skip, 0) + 1
            else:
                kept[case.key] = case.caption
            if case.color is not None:
                colors[case.key] = case.color
    _write_tar(out / "bad-000000.tar", first)

    # truncated tars: one cut inside a member, one cut on a 512-byte block boundary (just before a header)
    for index, cut, where in ((1, "cut_mid_image", "jpg"), (4, "cut_before_caption", "txt")):
        good = [_good(f"good_{index}_{i:03d}", rng) for i in range(good_per_shard[1 if index == 1 else 2])]
        kept.update({key: caption for key, _, caption in good})
        path = out / f"bad-{index:06d}.tar"
        _write_tar(path, [g[:2] for g in good] + [(cut, _good(cut, rng)[1])])
        with tarfile.open(path) as tar:
            member = next(info for info in tar if info.name == f"{cut}.{where}")
        end = member.offset_data + member.size // 2 if where == "jpg" else member.offset
        path.write_bytes(path.read_bytes()[:end])
    (out / "bad-000002.tar").write_bytes(b"")
    (out / "bad-000003.tar").write_bytes(np.random.default_rng(3).integers(0, 256, 5000, np.uint8).tobytes())

    expected = {**skips, "tar_error": 4}  # shards 1 and 4 (truncated), 2 (empty), 3 (not a tar)
    urls = [str(out / f"bad-{i:06d}.tar") for i in range(5)]
    return BadDataCorpus(urls=urls, expected_skips=expected, kept=kept, colors=colors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for the shards")
    args = parser.parse_args(argv)
    corpus = write_bad_data_shards(args.out)
    print(f"train_urls: {args.out}")
    print(f"expected skips per pass: {corpus.expected_skips}; samples delivered: {len(corpus.kept)}")


if __name__ == "__main__":
    main()
