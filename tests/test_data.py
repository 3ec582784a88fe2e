import io
import json
import logging
import pickle
import random
import tarfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data import synthetic
from ldm.data.datamodule import ImageTextDataModule
from ldm.data.synthetic import (
    COLORS,
    DEFAULT_HOLDOUT,
    NUM_TEMPLATES,
    SHAPES,
    SyntheticSpec,
    holdout_prompts,
    judge,
    parse_caption,
    render,
    write_synthetic_shards,
)
from ldm.data.transforms import ImageTransform, SampleError, decode_caption, decode_image, to_rgb
from ldm.data.webdataset import SKIP_REASONS, SkipCounter, expand_urls, image_text_pipeline

# ---------------------------------------------------------------- helpers


def _jpeg(image: Image.Image | np.ndarray, quality: int = 95) -> bytes:
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _sample(key: str, caption: str, color=(200, 30, 30)) -> list[tuple[str, bytes]]:
    image = _jpeg(Image.new("RGB", (40, 30), color))
    meta = json.dumps({"key": key, "caption": caption}).encode()
    return [(f"{key}.jpg", image), (f"{key}.json", meta), (f"{key}.txt", caption.encode())]


def _read_shard(path: str) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def _iterate(pipeline, num_workers: int = 0) -> list[dict]:
    return list(DataLoader(pipeline, batch_size=None, num_workers=num_workers))


# ---------------------------------------------------------------- synthetic shards


def test_captions_parse_back_for_every_template():
    for shape in SHAPES:
        for color in COLORS:
            spec = SyntheticSpec(shape, color, "white" if color != "white" else "black")
            for template in range(NUM_TEMPLATES):
                assert parse_caption(spec.caption(template)) == spec
    assert SyntheticSpec("star", "orange", "blue").caption(0) == "an orange star on a blue background"
    assert parse_caption("a photo of a dog") is None


def test_writer_round_trip(synthetic_shards):
    assert [Path(p).name for p in synthetic_shards] == ["shapes-000000.tar", "shapes-000001.tar"]
    keys = []
    for path in synthetic_shards:
        for key, sample in _read_shard(path).items():
            keys.append(key)
            assert set(sample) == {"jpg", "json", "txt"}
            meta = json.loads(sample["json"])
            caption = sample["txt"].decode()
            assert meta["key"] == key and meta["caption"] == caption and meta["status"] == "success"
            assert parse_caption(caption) == SyntheticSpec(meta["shape"], meta["color"], meta["background"])
            assert meta["color"] != meta["background"]
            assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32) == (meta["width"], meta["height"])
    assert keys == [f"{i:09d}" for i in range(48)]


def test_holdout_pairs_absent_but_every_colour_and_shape_present(tmp_path):
    paths = write_synthetic_shards(tmp_path, num_samples=400, samples_per_shard=200, resolution=16, seed=3)
    pairs = {
        (meta["color"], meta["shape"])
        for path in paths
        for meta in (json.loads(s["json"]) for s in _read_shard(path).values())
    }
    assert not pairs & set(DEFAULT_HOLDOUT)
    assert {c for c, _ in pairs} == set(COLORS) and {s for _, s in pairs} == set(SHAPES)
    prompts = holdout_prompts()
    assert len(prompts) == len(DEFAULT_HOLDOUT) * (len(COLORS) - 1)
    specs = {parse_caption(p) for p in prompts}
    assert {(s.color, s.shape) for s in specs} == set(DEFAULT_HOLDOUT)


def test_writer_template_subset(tmp_path):
    """`templates=(0,)` phrases every caption one way; the default draws from all templates; bad indices fail."""

    def captions(out, templates):
        paths = write_synthetic_shards(out, 60, 60, resolution=8, seed=2, templates=templates)
        return [s["txt"].decode() for s in _read_shard(paths[0]).values()]

    only_first = captions(tmp_path / "one", (0,))
    for text in only_first:
        spec = parse_caption(text)
        assert text == spec.caption(0)
    phrasings = {
        next(t for t in range(NUM_TEMPLATES) if parse_caption(c).caption(t) == c)
        for c in captions(tmp_path / "all", None)
    }
    assert phrasings == set(range(NUM_TEMPLATES))
    with pytest.raises(ValueError, match="templates"):
        write_synthetic_shards(tmp_path / "bad", 4, templates=(NUM_TEMPLATES,))


def test_writer_is_deterministic(tmp_path):
    def shard_bytes(out, seed):
        return [Path(p).read_bytes() for p in write_synthetic_shards(out, 30, 20, seed=seed)]

    first = shard_bytes(tmp_path / "a", 7)
    assert first == shard_bytes(tmp_path / "b", 7)
    assert first != shard_bytes(tmp_path / "c", 8)


def test_cli_writes_train_and_val(tmp_path, capsys):
    synthetic.main(
        ["--out", str(tmp_path), "--num-samples", "20", "--val-samples", "10"] + ["--samples-per-shard", "10"]
    )
    out = capsys.readouterr().out
    assert f"train_urls: {tmp_path}/train/shapes-{{000000..000001}}.tar" in out
    assert f"val_urls: {tmp_path}/val/shapes-000000.tar" in out
    train_keys = {
        k for p in expand_urls(f"{tmp_path}/train/shapes-{{000000..000001}}.tar") for k in _read_shard(p)
    }
    assert len(train_keys) == 20


def _judge_accuracy(images, specs, quality: int | None) -> dict[str, float]:
    results = [
        judge(image if quality is None else Image.open(io.BytesIO(_jpeg(image, quality))), spec)
        for image, spec in zip(images, specs)
    ]
    return {attribute: float(np.mean([r[attribute] for r in results])) for attribute in results[0]}


def test_judge_recognises_renders_clean_and_jpeg():
    rng = random.Random(0)
    specs = [
        SyntheticSpec(shape, color, rng.choice([c for c in COLORS if c != color]))
        for shape in SHAPES
        for color in COLORS
        for _ in range(3)
    ]
    images = [render(spec, 32, rng) for spec in specs]
    clean, q95, q75 = (_judge_accuracy(images, specs, q) for q in (None, 95, 75))
    print(f"judge accuracy over {len(specs)} renders: clean {clean}, JPEG q95 {q95}, JPEG q75 {q75}")
    assert min(clean.values()) >= 0.98
    assert min(q95.values()) >= 0.98
    assert q75["color"] >= 0.98 and q75["background"] >= 0.98 and q75["shape"] >= 0.93
    # wrong attributes are reported as wrong
    image, spec = images[0], specs[0]
    other_shape = next(s for s in SHAPES if s != spec.shape)
    assert judge(image, SyntheticSpec(other_shape, spec.color, spec.background)) == {
        "shape": False,
        "color": True,
        "background": True,
        "all": False,
    }
    # tensors in [-1, 1] (what a sampler returns) are accepted
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    assert judge(tensor, spec)["all"]


# ---------------------------------------------------------------- decoding and transforms


def test_to_rgb_handles_every_mode():
    assert to_rgb(Image.new("L", (4, 4), 100)).getpixel((0, 0)) == (100, 100, 100)
    assert to_rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 255))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("LA", (4, 4), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert to_rgb(palette).getpixel((0, 0)) == (10, 20, 30)
    palette.info["transparency"] = 1
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16") and to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))).getpixel((0, 0))[0] == 128
    # and through bytes: a 16-bit PNG and an RGBA PNG
    for image in (sixteen, Image.new("RGBA", (4, 4), (0, 0, 255, 255))):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        assert decode_image(buf.getvalue()).mode == "RGB"


def test_decode_image_errors_are_sample_errors():
    with pytest.raises(SampleError) as info:
        decode_image(_jpeg(skimage.data.coffee())[:2000])
    assert info.value.reason == "decode_error"
    with pytest.raises(SampleError):
        decode_image(b"not an image")


def test_decode_image_draft_keeps_shorter_side():
    image = decode_image(_jpeg(skimage.data.coffee()), min_size=64)  # 600x400 → DCT-scaled to 150x100
    assert image.size == (150, 100)


def test_decode_caption_fallbacks():
    assert decode_caption({"txt": b"  a cat \n", "json": b'{"caption": "other"}'}) == "a cat"
    assert decode_caption({"json": b'{"caption": " a dog "}'}) == "a dog"
    assert decode_caption({"json": b'{"caption": null}'}) == ""
    assert decode_caption({"txt": b""}) == ""
    assert decode_caption({}) == ""
    for bad in ({"txt": b"\xff\xfe caf\xe9"}, {"json": b"{not json"}, {"json": b'{"caption": 3}'}):
        with pytest.raises(SampleError) as info:
            decode_caption(bad)
        assert info.value.reason == "bad_caption"


@pytest.mark.parametrize("name", ["coffee", "astronaut"])
def test_center_and_random_crops_of_a_real_image(name):
    source = Image.fromarray(getattr(skimage.data, name)())
    resolution = 64
    scale = resolution / min(source.size)
    resized_size = (round(source.width * scale), round(source.height * scale))
    resized = np.array(source.resize(resized_size, Image.Resampling.BICUBIC), dtype=np.float32)
    transform = ImageTransform(resolution, crop="center")

    def as_pixels(tensor):
        assert tensor.shape == (3, resolution, resolution) and tensor.dtype == torch.float32
        assert tensor.min() >= -1 and tensor.max() <= 1
        return (tensor.permute(1, 2, 0).numpy() + 1) * 127.5

    def crop_error(pixels, x, y):
        return np.abs(pixels - resized[y : y + resolution, x : x + resolution]).mean()

    spare_x, spare_y = resized_size[0] - resolution, resized_size[1] - resolution
    center = as_pixels(transform(source))
    assert crop_error(center, spare_x // 2, spare_y // 2) < 2.0
    offsets = set()
    for seed in range(8):
        pixels = as_pixels(ImageTransform(resolution, crop="random")(source, random.Random(seed)))
        errors = {(x, y): crop_error(pixels, x, y) for x in range(spare_x + 1) for y in range(spare_y + 1)}
        best = min(errors, key=errors.get)
        assert errors[best] < 2.0
        offsets.add(best)
    assert len(offsets) > 1 if spare_x + spare_y > 0 else offsets == {(0, 0)}


def test_hflip_option():
    image = Image.fromarray(skimage.data.coffee())
    plain = ImageTransform(32, crop="center")(image)
    flipped = ImageTransform(32, crop="center", hflip_prob=1.0)(image)
    assert torch.equal(flipped, plain.flip(-1))


# ---------------------------------------------------------------- pipeline


def test_expand_urls():
    assert expand_urls("/d/s-{000000..000001}.tar") == ["/d/s-000000.tar", "/d/s-000001.tar"]
    assert expand_urls("/a/{0..1}.tar::/b/x.tar") == ["/a/0.tar", "/a/1.tar", "/b/x.tar"]
    assert expand_urls(["/a/{0..1}.tar", "pipe:cat /b/x.tar"]) == [
        "/a/0.tar",
        "/a/1.tar",
        "pipe:cat /b/x.tar",
    ]
    with pytest.raises(ValueError):
        expand_urls([])


def _brace(paths: list[str]) -> str:
    return synthetic.brace_pattern(paths)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_finite_pipeline_gives_every_sample_once(synthetic_shards, num_workers):
    pipeline = image_text_pipeline(_brace(synthetic_shards), 32, 10, resampled=False, partial_batches=True)
    batches = _iterate(pipeline, num_workers)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(48)]
    captions = {k: c for b in batches for k, c in zip(b["key"], b["caption"])}
    expected = {k: s["txt"].decode() for p in synthetic_shards for k, s in _read_shard(p).items()}
    assert captions == expected
    batch = batches[0]
    assert batch["image"].shape == (10, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["image"].std() > 0.2
    assert batch["n_skipped"].dtype == torch.long and sum(int(b["n_skipped"]) for b in batches) == 0
    assert set(batch["skipped"]) == set(SKIP_REASONS)


def test_resampled_pipeline_is_endless_and_seeded(synthetic_shards):
    def first_keys(seed):
        pipeline = image_text_pipeline(synthetic_shards, 32, 16, seed=seed, shuffle_buffer=20)
        return [b["key"] for b in islice(pipeline, 8)]  # 128 samples from 48

    keys = first_keys(0)
    assert len(keys) == 8 and keys == first_keys(0) and keys != first_keys(1)


def test_pipe_url_and_center_crop_is_deterministic(synthetic_shards):
    def batches(urls):
        return _iterate(image_text_pipeline(urls, 32, 8, crop="center", resampled=False, shuffle_buffer=0))

    direct = batches(synthetic_shards[0])
    piped = batches(f"pipe:cat {synthetic_shards[0]}")
    assert len(direct) == 3
    for a, b in zip(direct, piped):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def test_caption_falls_back_to_json(tmp_path):
    members = _sample("000000000", "from txt") + [
        m for m in _sample("000000001", "from json") if not m[0].endswith(".txt")
    ]
    url = _write_tar(tmp_path / "x.tar", members)
    (batch,) = _iterate(image_text_pipeline(url, 16, 2, resampled=False, shuffle_buffer=0))
    assert batch["caption"] == ["from txt", "from json"]
    assert batch["image"].shape == (2, 3, 16, 16)


def _damaged_shards(tmp_path: Path) -> tuple[list[str], set[str], dict[str, int]]:
    good = {f"{i:09d}" for i in range(12)}
    ordered = sorted(good)
    members = [m for k in ordered[:4] for m in _sample(k, f"caption {k}")]
    members += [("bad000001.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("bad000001.txt", b"corrupt jpeg")]
    members += [m for k in ordered[4:6] for m in _sample(k, f"caption {k}")]
    members += [("bad000002.txt", b"no image"), ("bad000002.json", b"{}")]
    members += [m for k in ordered[6:8] for m in _sample(k, f"caption {k}")]
    members += [(n, b"\xff\xfe\xfa" if n.endswith(".txt") else d) for n, d in _sample("bad000003", "x")]
    first = _write_tar(tmp_path / "damaged-0.tar", members)
    # a shard cut off in the middle of its last sample's image
    second = _write_tar(
        tmp_path / "damaged-1.tar",
        [m for k in ordered[8:] for m in _sample(k, f"caption {k}")] + _sample("bad000004", "truncated"),
    )
    with tarfile.open(second) as tar:
        last_image = next(info for info in tar if info.name == "bad000004.jpg")
    data = Path(second).read_bytes()
    Path(second).write_bytes(data[: last_image.offset_data + last_image.size // 2])
    expected = {
        **dict.fromkeys(SKIP_REASONS, 0),  # the filter reasons too, at 0
        "decode_error": 1,
        "missing_image": 1,
        "bad_caption": 1,
        "tar_error": 1,
    }
    return [first, second], good, expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_damaged_samples_are_skipped_and_counted_without_sleeping(tmp_path, monkeypatch, num_workers):
    def no_sleep(seconds):
        raise AssertionError(f"time.sleep({seconds}) called")

    monkeypatch.setattr(time, "sleep", no_sleep)
    urls, good, expected = _damaged_shards(tmp_path)
    pipeline = image_text_pipeline(urls, 16, 3, resampled=False, partial_batches=True)
    batches = _iterate(pipeline, num_workers)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(good)
    assert sum(int(b["n_skipped"]) for b in batches) == sum(expected.values())
    per_reason = {r: sum(int(b["skipped"][r]) for b in batches) for r in SKIP_REASONS}
    assert per_reason == expected


def test_failing_pipe_command_is_one_tar_error(synthetic_shards):
    urls = ["pipe:cat /nonexistent/shard.tar", synthetic_shards[0]]
    batches = _iterate(image_text_pipeline(urls, 32, 24, resampled=False, shuffle_buffer=0))
    assert len(batches) == 1 and len(batches[0]["key"]) == 24
    assert int(batches[0]["skipped"]["tar_error"]) == 1 == int(batches[0]["n_skipped"])


def test_skip_counter_logs_sparingly_and_pickles(caplog):
    counter = SkipCounter(log_every=4)
    with caplog.at_level(logging.WARNING, logger="ldm.data.webdataset"):
        for _ in range(9):
            counter.skip("decode_error", ValueError("boom"), "x.tar:1")
    assert len(caplog.records) == 3  # the 1st, 4th and 8th
    copy = pickle.loads(pickle.dumps(counter))
    assert copy.take()["decode_error"] == 9 and copy.take()["decode_error"] == 0


# ---------------------------------------------------------------- datamodule


def test_datamodule_loaders(synthetic_shards):
    module = ImageTextDataModule(
        train_urls=_brace(synthetic_shards),
        resolution=32,
        batch_size=8,
        val_urls=list(synthetic_shards[:1]),
        num_workers=0,
        shuffle_buffer=16,
    )
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and len(batch["caption"]) == 8
    val = list(module.val_dataloader())
    assert [len(b["key"]) for b in val] == [8, 8, 8]
    assert [k for b in val for k in b["key"]] == [f"{i:09d}" for i in range(24)]
    assert ImageTextDataModule(synthetic_shards, 32, 8).val_dataloader() == []
