"""Turn a Stable Diffusion 2-layout model (one file + its inference yaml) into ldm checkpoints: sample it with
sample.py, evaluate it with eval/, or train on from it.

    python scripts/import_sd.py v2-1_512-ema-pruned.safetensors sd21/ --config v2-inference.yaml
    python sample.py ckpt=sd21/model.ckpt prompts='[a photo of a cat]'
    python train.py experiment=laion_256 init_from=sd21/model.ckpt data.train_urls=...

Writes OUT_DIR/autoencoder.ckpt (stage 1, latent scale = the yaml's scale_factor) and OUT_DIR/model.ckpt (stage 2,
weights-only: the UNet as EMA weights, the autoencoder, the OpenCLIP text tower from `cond_stage_model.model.*`),
with the config of --experiment (default laion_256) where the yaml says nothing. SRC: `.safetensors`, or a torch
file read with `weights_only=True`. The yaml defaults to SRC's name with `.yaml` (as `scripts/export.py --format
sd` writes it). Only SD2-style text-to-image models import (OpenCLIP text tower, no class/image conditioning).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir

from ldm.utils.hydra_build import to_plain
from ldm.utils.sd_import import import_sd_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("src", help="the SD single file (.safetensors, .ckpt)")
    parser.add_argument("out_dir", help="folder for autoencoder.ckpt and model.ckpt")
    parser.add_argument("--config", help="its inference yaml (default: SRC with .yaml)")
    parser.add_argument("--experiment", default="laion_256", help="experiment whose config fills the rest")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config_path = Path(args.config) if args.config else Path(args.src).with_suffix(".yaml")
    try:
        if not config_path.is_file():
            raise FileNotFoundError(
                f"no inference yaml at {config_path}: pass --config path/to/v2-inference.yaml"
            )
        sd_config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            base = compose("train", overrides=[f"experiment={args.experiment}", f"run_dir={args.out_dir}"])
        bundle = import_sd_model(args.src, sd_config, to_plain(base), args.out_dir)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(
            f"import failed: {err!r}" if isinstance(err, KeyError) else f"import failed: {err}",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    summary = {
        "unet": {k: v for k, v in bundle["config"]["unet"].items() if k != "_target_"},
        "diffusion": bundle["diffusion"],
        "latent_scale": bundle["latent_scale"],
        "text_encoder": bundle["text_encoder"],
    }
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out_dir}/autoencoder.ckpt and {args.out_dir}/model.ckpt")
    return bundle


if __name__ == "__main__":
    main()
