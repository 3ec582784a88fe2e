"""Turn a pretrained Stable Diffusion autoencoder into an ldm stage-1 checkpoint, to skip training stage 1.

    python scripts/import_sd_vae.py SRC OUT.ckpt [--latent-scale S | --measure-on SHARDS]
    python train.py experiment=laion_256 autoencoder_ckpt=OUT.ckpt

SRC: diffusers `vae/diffusion_pytorch_model.safetensors` (e.g. sd-vae-ft-mse), a CompVis `model.ckpt`
(kl-f8, vae-ft-mse-840000-ema-pruned.ckpt) or a full SD checkpoint (its `first_stage_model.*` entries);
`.safetensors`, `.ckpt`, `.pt` or `.bin`. Torch files are read with `weights_only=True`.
"""

from __future__ import annotations

import argparse
import json

import torch

from ldm.utils.sd_import import diffusers_config_beside, import_sd_vae


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("src", help="SD VAE weights in CompVis or diffusers layout")
    parser.add_argument("out", help="the ldm stage-1 checkpoint to write (e.g. vae_sd.ckpt)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument(
        "--latent-scale",
        type=float,
        help="latent scale to record: the published one (scaling_factor in a diffusers config.json) or your own",
    )
    scale.add_argument(
        "--measure-on",
        metavar="SHARDS",
        help="measure the scale (1/std of the latents) on these WebDataset shards (brace pattern or folder)",
    )
    parser.add_argument(
        "--latent-shift", type=float, default=0.0, help="latent shift, subtracted before scaling (default 0)"
    )
    parser.add_argument("--resolution", type=int, default=256, help="image size recorded and measured at")
    parser.add_argument("--num-images", type=int, default=256, help="images --measure-on encodes")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size for --measure-on")
    parser.add_argument(
        "--num-groups",
        type=int,
        default=None,
        help="GroupNorm groups (default: norm_num_groups of a config.json beside SRC, else 32)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    bundle = import_sd_vae(
        args.src,
        args.out,
        latent_scale=args.latent_scale,
        latent_shift=args.latent_shift,
        measure_on=args.measure_on,
        resolution=args.resolution,
        num_images=args.num_images,
        batch_size=args.batch_size,
        num_groups=args.num_groups,
        device=args.device,
    )
    summary = {k: bundle[k] for k in ("latent_scale", "latent_shift", "downsample_factor", "source")}
    print(json.dumps({"autoencoder": bundle["config"]["autoencoder"], **summary}, indent=2))
    if bundle["latent_scale"] is None:
        hint = diffusers_config_beside(args.src) or {}
        known = (
            f" (the source's config.json says scaling_factor={hint['scaling_factor']})"
            if "scaling_factor" in hint
            else ""
        )
        print(
            f"latent_scale left unset: stage 2 measures it on its first batch{known}; pass --latent-scale to fix it"
        )
    print(f"wrote {args.out}; use it with: python train.py experiment=... autoencoder_ckpt={args.out}")
    return bundle


if __name__ == "__main__":
    main()
