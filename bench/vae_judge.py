"""What shapes an autoencoder keeps: the synthetic data's judge on fresh renders and on their reconstructions.

    python bench/vae_judge.py quickstart_out/vae/checkpoints/last.ckpt --num 300

Renders `--num` images (shapes in turn, random colours, sizes from `ldm.data.synthetic.SIZE_RANGE`), JPEG-encodes
them as the shard writer does, decodes the posterior mode, and prints the judge's shape accuracy per shape on
the originals and on the reconstructions, the commonest confusions, and the mean per-image PSNR. Stage 2 cannot
draw a shape right more often than its autoencoder keeps it.
"""

from __future__ import annotations

import argparse
import collections
import io
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.data import synthetic  # noqa: E402
from ldm.inference import load_autoencoder  # noqa: E402


def renders(num: int, resolution: int, seed: int) -> tuple[list[Image.Image], list[synthetic.SyntheticSpec]]:
    rng = random.Random(seed)
    images, specs = [], []
    for i in range(num):
        color = rng.choice(synthetic.COLORS)
        background = rng.choice([c for c in synthetic.COLORS if c != color])
        spec = synthetic.SyntheticSpec(synthetic.SHAPES[i % len(synthetic.SHAPES)], color, background)
        jpeg = synthetic._encode(
            synthetic.render(spec, resolution, rng), "jpg"
        )  # the shard writer's encoding
        images.append(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        specs.append(spec)
    return images, specs


def shape_report(images, specs) -> dict:
    per_shape, confusions = collections.defaultdict(list), collections.Counter()
    for image, spec in zip(images, specs, strict=True):
        predicted, _ = synthetic.classify(image)
        shape = predicted.shape if predicted is not None else None
        per_shape[spec.shape].append(shape == spec.shape)
        if shape != spec.shape:
            confusions[f"{spec.shape}→{shape}"] += 1
    return {
        "shape": float(np.mean([ok for oks in per_shape.values() for ok in oks])),
        "per_shape": {s: float(np.mean(oks)) for s, oks in per_shape.items()},
        "confusions": dict(confusions.most_common(6)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ckpt", help="a stage-1 (autoencoder) checkpoint")
    parser.add_argument("--num", type=int, default=300)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    autoencoder, bundle = load_autoencoder(args.ckpt, "cpu")
    resolution = bundle["config"]["data"]["resolution"]
    images, specs = renders(args.num, resolution, args.seed)
    x = torch.stack(
        [torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1) for im in images]
    )
    with torch.no_grad():
        recon = autoencoder.decode(autoencoder.encode(x).mode()).clamp(-1, 1)
    psnr = (10 * torch.log10(4 / ((recon - x) ** 2).mean((1, 2, 3)))).mean().item()
    for label, imgs in (("originals", images), ("reconstructions", list(recon))):
        r = shape_report(imgs, specs)
        per = "  ".join(f"{s} {v:.0%}" for s, v in r["per_shape"].items())
        print(f"{label:<16} shape {r['shape']:.1%}  ({per})  confusions: {r['confusions'] or 'none'}")
    print(
        f"reconstruction PSNR {psnr:.2f} dB (mean per image, {args.num} images, size range {synthetic.SIZE_RANGE})"
    )


if __name__ == "__main__":
    main()
