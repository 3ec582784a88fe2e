"""Synthetic captioned shapes in img2dataset's WebDataset layout, and a judge for generated samples.

Each sample is one coloured shape on a plain background, captioned with its shape, colour and background
("a red circle on a blue background"). Some (colour, shape) pairs are held out of the training shards so that
a trained model can be asked for combinations it has never seen (compositional generalisation).

    python -m ldm.data.synthetic --out data/shapes --num-samples 20000 --val-samples 1000
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 165, 50),
    "blue": (35, 65, 225),
    "yellow": (245, 225, 35),
    "purple": (140, 45, 175),
    "orange": (250, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
# (colour, shape) pairs never written to training shards; each colour and shape still occurs with other partners.
DEFAULT_HOLDOUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "star"),
    ("yellow", "circle"),
    ("green", "square"),
)
SUPERSAMPLE = 4
# Side of the shape's bounding box, as a fraction of the canvas. At 32 px a shape under ~0.5 of the canvas is a
# 4×4-latent blob to an f4 autoencoder: a 1,000-step quickstart autoencoder kept 28 % of stars at 0.4–0.8 (they
# decode as circles) and 56 % at 0.55–0.9 (docs/benchmarks.md). Above 0.9 a square can cover the whole border, and
# the background is then undefined.
SIZE_RANGE = (0.55, 0.9)

# written with "a"; "a" before a vowel becomes "an" ("an orange star")
_TEMPLATES: tuple[str, ...] = (
    "a {color} {shape} on a {background} background",
    "{color} {shape}, {background} background",
    "a picture of a {color} {shape} on {background}",
    "a {shape} in {color} on a {background} background",
    "{background} background with a {color} {shape}",
)
NUM_TEMPLATES = len(_TEMPLATES)


@dataclass(frozen=True)
class SyntheticSpec:
    shape: str
    color: str
    background: str

    def caption(self, template: int = 0) -> str:
        text = _TEMPLATES[template % NUM_TEMPLATES].format(
            color=self.color, shape=self.shape, background=self.background
        )
        return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _template_regex(template: str) -> re.Pattern[str]:
    colors, shapes = "|".join(COLORS), "|".join(SHAPES)
    pattern = re.escape(template)
    for name, alternatives in (("color", colors), ("shape", shapes), ("background", colors)):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{alternatives})")
    return re.compile(pattern)


_TEMPLATE_REGEXES = tuple(_template_regex(t) for t in _TEMPLATES)


def parse_caption(caption: str) -> SyntheticSpec | None:
    """Inverse of `SyntheticSpec.caption` for every template; None for any other text."""
    text = re.sub(r"\ban\b", "a", " ".join(caption.strip().lower().split()))
    for regex in _TEMPLATE_REGEXES:
        match = regex.fullmatch(text)
        if match:
            return SyntheticSpec(match["shape"], match["color"], match["background"])
    return None


# ---------------------------------------------------------------- rendering


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Outline in the unit square (x right, y down), touching all four sides."""
    if shape == "square":
        return [(0, 0), (1, 0), (1, 1), (0, 1)]
    if shape == "triangle":
        return [(0.5, 0), (1, 1), (0, 1)]
    if shape == "diamond":
        return [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    if shape == "cross":
        a, b = 1 / 3, 2 / 3
        outline = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a)]
        return [*outline, (a, a)]
    if shape == "star":  # five points, inner radius 0.4 of the outer one, then stretched to fill the square
        radii = [1.0 if i % 2 == 0 else 0.4 for i in range(10)]
        pts = [(r * math.sin(i * math.pi / 5), -r * math.cos(i * math.pi / 5)) for i, r in enumerate(radii)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def shape_mask(shape: str, resolution: int, box: tuple[float, float, float, float]) -> Image.Image:
    """Coverage ("L" image) of `shape` filling `box` (x0, y0, x1, y1 in pixels): drawn at 4x, box-filtered down.

    A box filter is exact area coverage: antialiased edges without the ringing halo of LANCZOS.
    """
    big = Image.new("L", (resolution * SUPERSAMPLE,) * 2, 0)
    x0, y0 = box[0] * SUPERSAMPLE, box[1] * SUPERSAMPLE
    x1, y1 = box[2] * SUPERSAMPLE - 1, box[3] * SUPERSAMPLE - 1  # ImageDraw's end coordinates are inclusive
    draw = ImageDraw.Draw(big)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    else:
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in _unit_polygon(shape)], fill=255)
    return big.reduce(SUPERSAMPLE)


def render_box(spec: SyntheticSpec, resolution: int, box: tuple[float, float, float, float]) -> Image.Image:
    """Render `spec` with the shape filling `box` (x0, y0, x1, y1 in output pixels), antialiased."""
    if spec.shape not in SHAPES or spec.color not in PALETTE or spec.background not in PALETTE:
        raise ValueError(f"unknown spec {spec}")
    size = (resolution, resolution)
    return Image.composite(
        Image.new("RGB", size, PALETTE[spec.color]),
        Image.new("RGB", size, PALETTE[spec.background]),
        shape_mask(spec.shape, resolution, box),
    )


def render(spec: SyntheticSpec, resolution: int, rng: random.Random | np.random.Generator) -> Image.Image:
    """Shape of random size (`SIZE_RANGE` of the canvas) at a random position fully inside the canvas."""
    size = rng.uniform(*SIZE_RANGE) * resolution
    x0, y0 = rng.uniform(0, resolution - size), rng.uniform(0, resolution - size)
    return render_box(spec, resolution, (x0, y0, x0 + size, y0 + size))


def training_combinations(holdout: Sequence[tuple[str, str]] = DEFAULT_HOLDOUT) -> list[tuple[str, str]]:
    held = {tuple(pair) for pair in holdout}
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in held]


def holdout_specs(
    holdout: Sequence[tuple[str, str]] = DEFAULT_HOLDOUT, backgrounds: Sequence[str] | None = None
) -> list[SyntheticSpec]:
    specs = []
    for color, shape in holdout:
        for background in backgrounds if backgrounds is not None else COLORS:
            if background != color:
                specs.append(SyntheticSpec(shape, color, background))
    return specs


def holdout_prompts(
    holdout: Sequence[tuple[str, str]] = DEFAULT_HOLDOUT,
    backgrounds: Sequence[str] | None = None,
    template: int = 0,
) -> list[str]:
    """Prompts for the held-out (colour, shape) pairs on every other background (or those given)."""
    return [spec.caption(template) for spec in holdout_specs(holdout, backgrounds)]


# ---------------------------------------------------------------- shard writing


def _encode(image: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format in ("jpg", "jpeg"):
        image.save(buf, format="JPEG", quality=95)
    elif image_format == "png":
        image.save(buf, format="PNG")
    elif image_format == "webp":
        image.save(buf, format="WEBP", quality=95)
    else:
        raise ValueError(f"unsupported image_format {image_format!r}")
    return buf.getvalue()


def write_synthetic_shards(
    out_dir: str | Path,
    num_samples: int,
    samples_per_shard: int = 1000,
    resolution: int = 32,
    seed: int = 0,
    holdout: Sequence[tuple[str, str]] = DEFAULT_HOLDOUT,
    image_format: str = "jpg",
    prefix: str = "shapes",
    templates: Sequence[int] | None = None,
) -> list[str]:
    """Write `{prefix}-{000000..}.tar` shards of key.{jpg,txt,json} samples; returns the shard paths.

    templates: indices of the caption templates to draw from (default: all `NUM_TEMPLATES`). `(0,)` writes every
    caption as "a {color} {shape} on a {background} background", which a randomly initialised text tower can
    tell apart much sooner (the CPU quickstart; docs/benchmarks.md). The bytes written are a function of the
    arguments only (tar mtimes are fixed at 0). Each shard is written to a temporary name and renamed when
    complete: an interrupted run leaves no truncated shard under a shard's name.
    """
    if templates is not None:
        templates = [int(t) for t in templates]
        if not templates or not all(0 <= t < NUM_TEMPLATES for t in templates):
            raise ValueError(
                f"templates must be a non-empty subset of 0..{NUM_TEMPLATES - 1}, got {templates}"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combos = training_combinations(holdout)
    paths: list[str] = []
    writer = None

    def close() -> None:
        if writer is not None:
            writer.close()
            os.replace(_partial(paths[-1]), paths[-1])

    for index in range(num_samples):
        if index % samples_per_shard == 0:
            close()
            paths.append(str(out / f"{prefix}-{len(paths):06d}.tar"))
            # an int mtime: a float one costs a pax header per member, and reading them doubles tar parsing
            writer = wds.TarWriter(_partial(paths[-1]), encoder=False, mtime=0)
        color, shape = rng.choice(combos)
        background = rng.choice([c for c in COLORS if c != color])
        spec = SyntheticSpec(shape, color, background)
        template = rng.randrange(NUM_TEMPLATES) if templates is None else rng.choice(templates)
        caption = spec.caption(template)
        image = render(spec, resolution, rng)
        key = f"{index:09d}"
        meta = {
            "key": key,
            "caption": caption,
            "status": "success",
            "width": resolution,
            "height": resolution,
            "original_width": resolution,
            "original_height": resolution,
            "shape": shape,
            "color": color,
            "background": background,
        }
        writer.write(
            {
                "__key__": key,
                image_format: _encode(image, image_format),
                "txt": caption.encode("utf-8"),
                "json": json.dumps(meta).encode("utf-8"),
            }
        )
    close()
    return paths


def _partial(path: str) -> str:
    """The temporary name a shard is written under (not matched by `*.tar`)."""
    return str(Path(path).with_name(f".{Path(path).name}.tmp"))


def brace_pattern(paths: Sequence[str]) -> str:
    """`dir/shapes-{000000..000009}.tar` for shards written by `write_synthetic_shards`."""
    if len(paths) == 1:
        return paths[0]
    head, _, _ = paths[0].rpartition("-")
    first, last = (Path(p).stem.rpartition("-")[2] for p in (paths[0], paths[-1]))
    return f"{head}-{{{first}..{last}}}.tar"


# ---------------------------------------------------------------- judging generated samples


def _as_rgb_array(image) -> np.ndarray:
    """(H, W, 3) float in [0, 255] from PIL, uint8/float HWC arrays (float in [0, 1]) or CHW tensors in [-1, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        arr = image.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).permute(1, 2, 0).numpy()
        return arr
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr[..., :3].astype(np.float32)
    return np.clip(arr[..., :3].astype(np.float32), 0, 1) * 255


_JUDGE_RESOLUTION = 64
_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)


def _nearest_color(pixels: np.ndarray) -> np.ndarray:
    """Palette index of each (..., 3) pixel."""
    return np.argmin(((pixels[..., None, :] - _PALETTE_ARRAY) ** 2).sum(-1), axis=-1)


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def _fit_template(shape: str, soft: np.ndarray, box: tuple[float, ...], steps: int = 8) -> float:
    """Best soft IoU of `shape` against the foreground, moving each box edge in half-pixel steps."""
    resolution = soft.shape[0]

    def iou(b: tuple[float, ...]) -> float:
        return _soft_iou(np.asarray(shape_mask(shape, resolution, b), dtype=np.float32) / 255, soft)

    best = iou(box)
    for _ in range(steps):
        candidates = [box[:i] + (box[i] + d,) + box[i + 1 :] for i in range(4) for d in (-0.5, 0.5)]
        scores = [iou(c) for c in candidates]
        if max(scores) <= best:
            break
        best, box = max(scores), candidates[int(np.argmax(scores))]
    return best


def classify(image) -> tuple[SyntheticSpec | None, dict[str, float]]:
    """Best-effort (shape, colour, background) of a square image, and the IoU of each shape template.

    background = nearest palette colour of the median border pixel; colour = nearest palette colour of the
    median pixel far from the background; shape = the template with the highest soft IoU against the
    foreground, each template's bounding box fitted by a few steps of coordinate ascent (JPEG blurs thin tips).
    Images above 64 px are box-filtered to 64 px first.
    """
    arr = _as_rgb_array(image)
    h, w, _ = arr.shape
    if h != w:
        raise ValueError(f"classify expects a square image, got {w}x{h}")
    if h > _JUDGE_RESOLUTION:  # the fit costs O(pixels); shapes are most of the canvas
        small = Image.fromarray(arr.round().clip(0, 255).astype(np.uint8))
        arr = np.asarray(small.resize((_JUDGE_RESOLUTION,) * 2, Image.Resampling.BOX), dtype=np.float32)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0)
    bg_index = int(_nearest_color(bg))
    distance = np.linalg.norm(arr - bg, axis=-1)
    if distance.max() < 40:  # nothing but background
        return None, {}
    # the shape's colour from its core: edge pixels blend into the background (and chroma subsampling
    # mixes them further), so only pixels far from the background vote
    core = arr[distance >= 0.6 * distance.max()]
    fg_index = int(_nearest_color(np.median(core, axis=0)))
    if fg_index == bg_index:
        return None, {}
    fg = np.median(core, axis=0)
    # soft foreground: position of each pixel on the segment from the measured background to shape colour
    soft = np.clip(((arr - bg) @ (fg - bg)) / max(float((fg - bg) @ (fg - bg)), 1e-6), 0, 1)
    soft = np.clip((soft - 0.2) / 0.6, 0, 1)  # drop compression ringing, saturate the interior
    rows, cols = np.flatnonzero((soft > 0.5).any(1)), np.flatnonzero((soft > 0.5).any(0))
    if len(rows) == 0:
        return None, {}
    box = (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))
    ious = {shape: _fit_template(shape, soft, box) for shape in SHAPES}
    shape = max(ious, key=ious.get)
    return SyntheticSpec(shape, COLORS[fg_index], COLORS[bg_index]), ious


def judge(image, spec: SyntheticSpec) -> dict[str, bool]:
    """Whether an image shows `spec`: {"shape", "color", "background", "all"} → bool."""
    predicted, _ = classify(image)
    if predicted is None:
        return {"shape": False, "color": False, "background": False, "all": False}
    result = {
        "shape": predicted.shape == spec.shape,
        "color": predicted.color == spec.color,
        "background": predicted.background == spec.background,
    }
    result["all"] = all(result.values())
    return result


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (train/ and val/ are created inside)")
    parser.add_argument("--num-samples", type=int, required=True)
    parser.add_argument("--val-samples", type=int, default=0, help="same distribution, different seed")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--image-format", default="jpg", choices=("jpg", "png", "webp"))
    parser.add_argument(
        "--templates",
        type=int,
        nargs="+",
        default=None,
        help=f"caption templates to use (0..{NUM_TEMPLATES - 1}; default all)",
    )
    args = parser.parse_args(argv)
    splits = [("train", args.num_samples, args.seed)]
    if args.val_samples > 0:
        splits.append(("val", args.val_samples, args.seed + 1_000_003))
    for split, n, seed in splits:
        start = time.perf_counter()
        paths = write_synthetic_shards(
            Path(args.out) / split,
            n,
            samples_per_shard=args.samples_per_shard,
            resolution=args.resolution,
            seed=seed,
            image_format=args.image_format,
            templates=args.templates,
        )
        elapsed = time.perf_counter() - start
        print(f"{split}: {n} samples in {len(paths)} shards, {elapsed:.1f} s ({n / elapsed:.0f} samples/s)")
        print(f"{split}_urls: {brace_pattern(paths)}")
    print("held-out (colour, shape) pairs:", ", ".join(f"{c} {s}" for c, s in DEFAULT_HOLDOUT))


if __name__ == "__main__":
    main()
