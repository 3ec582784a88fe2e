"""Image grids with captions, and PNGs that carry their generation settings in metadata."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

METADATA_KEY = "ldm"  # PNG text chunk holding the JSON of the generation settings


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] → RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def labelled_grid(
    images: torch.Tensor,
    ncols: int,
    row_labels: Sequence[str] | None = None,
    cell: int | None = None,
    pad: int = 2,
) -> Image.Image:
    """Rows of `ncols` images with a caption under each row; small images are upscaled (nearest) to `cell` px."""
    n, _, h, w = images.shape
    nrows = -(-n // ncols)
    cell = cell or max(h, 96)
    scale = max(1, cell // max(h, w))
    ch, cw = h * scale, w * scale
    font = ImageFont.load_default(size=max(10, min(14, cw // 6)))
    width = ncols * (cw + pad) + pad
    wrap = max(12, width // 7)
    labels = [textwrap.wrap(label, wrap) or [""] for label in (row_labels or [""] * nrows)]
    line_h = font.size + 3
    label_h = [len(lines) * line_h + 4 if row_labels else 0 for lines in labels]
    height = sum(ch + pad + lh for lh in label_h) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    y = pad
    for r in range(nrows):
        for c in range(ncols):
            i = r * ncols + c
            if i < n:
                tile = to_pil(images[i]).resize((cw, ch), Image.NEAREST)
                grid.paste(tile, (pad + c * (cw + pad), y))
        y += ch + pad
        for j, line in enumerate(labels[r] if row_labels else []):
            draw.text((pad, y + j * line_h), line, fill="black", font=font)
        y += label_h[r]
    return grid


def save_png(image: Image.Image, path: str | os.PathLike, metadata: Mapping | None = None) -> Path:
    """Write a PNG; `metadata` goes into a JSON text chunk (key "ldm") plus one chunk per top-level field."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if metadata:
        info.add_text(METADATA_KEY, json.dumps(dict(metadata), sort_keys=True))
        for key, value in metadata.items():
            info.add_text(str(key), str(value))
    image.save(path, pnginfo=info)
    return path


def read_png_metadata(path: str | os.PathLike) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text[METADATA_KEY]) if METADATA_KEY in getattr(im, "text", {}) else {}
