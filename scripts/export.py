"""Export a stage-2 checkpoint for diffusers, ComfyUI or AUTOMATIC1111 (EMA weights unless --raw).

    python scripts/export.py CKPT OUT_DIR                                  # diffusers StableDiffusionPipeline folder
    python scripts/export.py CKPT model.safetensors --format sd            # SD2 single file + model.yaml beside it
    python scripts/export.py CKPT OUT_DIR --dtype float16 --overwrite

diffusers: `StableDiffusionPipeline.from_pretrained(OUT_DIR)` loads UNet, VAE, the OpenCLIP text tower as a
transformers CLIPTextModel with its tokenizer (the whole tower as CLIPTextModelWithProjection when the UNet takes
pooled text), and a DDIM scheduler with the exact training betas (README,
"Export"). sd: the CompVis layout of Stable Diffusion 2
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.model.*`) with its inference yaml; only
models that layout can describe (32-group GroupNorms, no pooled-text input, a CompVis-named schedule) export to it,
and the error says which part does not fit.
"""

from __future__ import annotations

import argparse
import json
import sys

from ldm.export import DTYPES, FORMATS, export
from ldm.utils.weights import MissingWeightsError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("ckpt", help="a stage-2 checkpoint (last.ckpt, or a weights-only snapshot)")
    parser.add_argument("out", help="output folder (diffusers) or .safetensors file (sd)")
    parser.add_argument("--format", choices=FORMATS, default="diffusers")
    parser.add_argument("--raw", action="store_true", help="export the raw (not EMA) UNet weights")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="tensor dtype written")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        summary = export(
            args.ckpt,
            args.out,
            format=args.format,
            use_ema=not args.raw,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, FileNotFoundError, MissingWeightsError) as err:
        print(f"export failed: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({k: v for k, v in summary.items() if k not in ("unet_config", "vae_config")}, indent=2))
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
