"""Loader speed: images/s per CPU core from JPEG shards of mixed sizes to (3, R, R) tensors in [-1, 1].

    python bench/loader.py            # 320 images, 5 rounds, 256 and 512 px (a few minutes)
    python bench/loader.py --quick    # 40 images, 3 rounds (under a minute)

The shards hold real photos (skimage.data) cropped to a random aspect ratio (1:1 to 2:1, either orientation),
resized to a longer side of 300-1600 px, given a little sensor-like grain (σ = 3 grey levels; upscaled photos
are otherwise smoother than real ones and would decode unrealistically fast) and saved as JPEG quality 90.

Pipelines, each a `DataLoader(num_workers=0)` over the same shards, centre crop, batches of 16:
- plain: `wds.WebDataset(urls).decode("pil")`, i.e. a full-size decode, then a PIL bicubic resize of the
  shorter side to R, a centre crop and torchvision's to_tensor + normalize. Its geometry (rounding of the resized
  size, crop offset) is ldm's, so its output is the reference the others are compared with.
- torchvision: the same decode, then the usual `Resize(R, bicubic) + CenterCrop(R) + ToTensor() + Normalize`.
- ldm: `ldm.data.webdataset.image_text_pipeline`: DCT-scaled JPEG decode (`decode_image(min_size=R)`), one
  resize+crop pass in full-size coordinates (`ImageTransform`), and planar to_tensor.
The process is pinned to one core with one torch thread. "Per core" is images per second of the process's own
CPU time (`time.process_time`), which other load on a shared machine barely changes; wall-clock rates are
reported too. The pipelines run interleaved (ABC, CBA, ...) and the speed-up is the median over rounds of
the per-round ratio. Fidelity: PSNR and mean absolute difference (grey levels, 0-255) of each pipeline's
tensors against the plain pipeline's, image by image.
Results: bench/results/loader.json and a markdown table on stdout (for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, features
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.transforms import functional as TF

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.data.webdataset import image_text_pipeline  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")
PIPELINES = ("plain", "torchvision", "ldm")
BATCH = 16


# ---------------------------------------------------------------- data


def photos() -> list[Image.Image]:
    """Real RGB photos bundled with scikit-image (no download)."""
    from skimage import data

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]


def make_jpegs(n: int, seed: int = 0, sizes: tuple[int, int] = (300, 1600), quality: int = 90) -> list[bytes]:
    """`n` JPEGs, longer side uniform in `sizes`, aspect ratio uniform in 1-2, random orientation."""
    rng, sources = random.Random(seed), photos()
    out = []
    for i in range(n):
        source = sources[i % len(sources)]
        long_side, aspect = rng.randint(*sizes), rng.uniform(1.0, 2.0)
        short_side = max(sizes[0], round(long_side / aspect))
        width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
        # the largest crop of the source with this aspect ratio, at a random place
        fit = min(source.width / width, source.height / height)
        cw, ch = round(width * fit), round(height * fit)
        left, top = rng.randint(0, source.width - cw), rng.randint(0, source.height - ch)
        image = source.resize((width, height), Image.Resampling.LANCZOS, box=(left, top, left + cw, top + ch))
        grain = np.random.default_rng([seed, i]).normal(0.0, 3.0, (height, width, 1))
        pixels = (np.asarray(image, dtype=np.float32) + grain).round().clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def write_shards(folder: Path, jpegs: list[bytes], per_shard: int = 64) -> list[str]:
    """img2dataset layout: key.jpg / key.txt / key.json."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(jpegs), per_shard):
        path = str(folder / f"{start // per_shard:06d}.tar")
        with wds.TarWriter(path) as sink:
            for i, data in enumerate(jpegs[start : start + per_shard], start):
                key = f"{i:09d}"
                caption = f"photo {i}"
                meta = json.dumps({"key": key, "caption": caption}).encode()
                sink.write({"__key__": key, "jpg": data, "txt": caption.encode(), "json": meta})
        paths.append(path)
    return paths


# ---------------------------------------------------------------- pipelines


def plain_transform(resolution: int) -> Callable[[Image.Image], torch.Tensor]:
    """Full-size image → resize the shorter side (ldm's rounding) → centre crop → to_tensor → [-1, 1]."""

    def transform(image: Image.Image) -> torch.Tensor:
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        return TF.normalize(TF.to_tensor(image), [0.5] * 3, [0.5] * 3)

    return transform


def torchvision_transform(resolution: int) -> Callable[[Image.Image], torch.Tensor]:
    return T.Compose(
        [
            T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(resolution),
            T.ToTensor(),
            T.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )


def _webdataset(urls: list[str], transform: Callable) -> Iterable:
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple("__key__", "jpg")
        .map_tuple(lambda key: key, transform)
        .batched(BATCH, partial=True)
    )
    return ({"key": keys, "image": images} for keys, images in DataLoader(dataset, batch_size=None))


def pipeline(name: str, urls: list[str], resolution: int) -> Iterable[dict]:
    """Batches {"key": [str], "image": (B, 3, R, R)} of every image in `urls`, in order."""
    if name == "plain":
        return _webdataset(urls, plain_transform(resolution))
    if name == "torchvision":
        return _webdataset(urls, torchvision_transform(resolution))
    if name == "ldm":
        stream = image_text_pipeline(
            urls,
            resolution,
            BATCH,
            crop="center",
            shuffle_buffer=0,
            resampled=False,
            split_by_node=False,
            partial_batches=True,
        )
        return DataLoader(stream, batch_size=None, num_workers=0)
    raise ValueError(f"unknown pipeline {name!r}")


def timed_pass(name: str, urls: list[str], resolution: int) -> tuple[int, float, float]:
    """(images, CPU seconds, wall seconds) of one pass over the shards."""
    wall, cpu, count = time.perf_counter(), time.process_time(), 0
    for batch in pipeline(name, urls, resolution):
        count += len(batch["key"])
    return count, time.process_time() - cpu, time.perf_counter() - wall


def fidelity(urls: list[str], resolution: int) -> dict[str, dict[str, float]]:
    """PSNR (pooled over all images, and the worst image) and mean |difference| against `plain`, 0-255 scale."""
    outputs = {
        name: {k: img for b in pipeline(name, urls, resolution) for k, img in zip(b["key"], b["image"])}
        for name in PIPELINES
    }
    result = {}
    for name in PIPELINES[1:]:
        errors = [(outputs[name][k] - ref) * 127.5 for k, ref in outputs["plain"].items()]
        mse = [float(e.pow(2).mean()) for e in errors]
        result[name] = {
            "psnr_db": _psnr(statistics.fmean(mse)),
            "worst_psnr_db": _psnr(max(mse)),
            "mean_abs_diff": statistics.fmean(float(e.abs().mean()) for e in errors),
        }
    return result


def _psnr(mse: float) -> float:
    return 10 * math.log10(255**2 / max(mse, 1e-10))


# ---------------------------------------------------------------- the benchmark


def run(
    images: int, resolutions: Iterable[int], rounds: int, work: Path, sizes: tuple[int, int] = (300, 1600)
) -> dict:
    """Write the shards under `work`, time every pipeline `rounds` times per resolution, interleaved."""
    torch.set_num_threads(1)
    jpegs = make_jpegs(images, sizes=sizes)
    urls = write_shards(work / "shards", jpegs)
    pixels = [Image.open(io.BytesIO(j)).size for j in jpegs]
    rows, speedups, quality = [], {}, {}
    for resolution in resolutions:
        for name in PIPELINES:  # warm-up: imports, page cache, first-call allocations
            timed_pass(name, urls[:1], resolution)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in PIPELINES}
        for rnd in range(rounds):
            for name in PIPELINES if rnd % 2 == 0 else PIPELINES[::-1]:
                count, cpu, wall = timed_pass(name, urls, resolution)
                if count != images:
                    raise RuntimeError(f"{name} gave {count} of {images} images")
                times[name].append((cpu, wall))
        for name in PIPELINES:
            cpu = statistics.median(t[0] for t in times[name])
            wall = statistics.median(t[1] for t in times[name])
            row = {
                "resolution": resolution,
                "pipeline": name,
                "images_per_cpu_s": images / cpu,
                "images_per_wall_s": images / wall,
                "speedup_cpu": statistics.median(p[0] / t[0] for p, t in zip(times["plain"], times[name])),
                "speedup_wall": statistics.median(p[1] / t[1] for p, t in zip(times["plain"], times[name])),
                "rounds_cpu_s": [t[0] for t in times[name]],
                "rounds_wall_s": [t[1] for t in times[name]],
            }
            rows.append(row)
        speedups[str(resolution)] = next(
            r["speedup_cpu"] for r in rows[-len(PIPELINES) :] if r["pipeline"] == "ldm"
        )
        quality[str(resolution)] = fidelity(urls, resolution)
    return {
        "meta": _machine(),
        "settings": {
            "images": images,
            "rounds": rounds,
            "batch": BATCH,
            "longer_side_px": list(sizes),
            "mean_megapixels": statistics.fmean(w * h for w, h in pixels) / 1e6,
            "mean_jpeg_kb": statistics.fmean(len(j) for j in jpegs) / 1e3,
            "core": sorted(os.sched_getaffinity(0)),
        },
        "rows": rows,
        "speedup_ldm_vs_plain_cpu": speedups,
        "fidelity_vs_plain": quality,
    }


def _machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown"
    return {
        "cpu": f"{platform.machine()} {model}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": Image.__version__,
        "libjpeg": f"libjpeg-turbo {features.version('libjpeg_turbo')}"
        if features.check_feature("libjpeg_turbo")
        else f"libjpeg {features.version('jpg')}",
        "webdataset": wds.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def markdown(result: dict) -> str:
    quality = result["fidelity_vs_plain"]
    lines = [
        "| px | pipeline | img/s per core (CPU time) | img/s (wall) | speed-up vs plain (CPU / wall) "
        "| PSNR vs plain (worst image) | mean abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        res, name = row["resolution"], row["pipeline"]
        fid = quality[str(res)].get(name)
        lines.append(
            f"| {res} | {name} | {row['images_per_cpu_s']:.1f} | {row['images_per_wall_s']:.1f} "
            f"| **{row['speedup_cpu']:.2f}×** / {row['speedup_wall']:.2f}× "
            + (
                f"| {fid['psnr_db']:.1f} dB ({fid['worst_psnr_db']:.1f}) | {fid['mean_abs_diff']:.2f} |"
                if fid
                else "| (reference) | 0 |"
            )
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="40 images, 3 rounds")
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resolutions", default="256,512")
    parser.add_argument("--core", type=int, default=None, help="CPU to pin to (default: the last allowed)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "loader.json"))
    args = parser.parse_args()
    images, rounds = (40, 3) if args.quick else (args.images, args.rounds)
    core = args.core if args.core is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    with tempfile.TemporaryDirectory() as work:
        result = run(images, [int(r) for r in args.resolutions.split(",")], rounds, Path(work))
    result["command"] = "python bench/loader.py" + (" --quick" if args.quick else "")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"\n{result['meta']['cpu']}; {result['settings']}; results in {args.out}")


if __name__ == "__main__":
    main()
