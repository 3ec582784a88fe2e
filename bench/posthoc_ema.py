"""Post-hoc EMA on a trained run: the held-out loss and prompt adherence against the EMA width.

    python train.py experiment=tiny data=latents ... stage.posthoc_ema='[0.05,0.1]' callbacks.posthoc_ema.every_n_steps=50
    python bench/posthoc_ema.py --run runs/tiny/<date> --widths 0.02,0.05,0.1,0.15,0.2,0.25

The EMA of each width (sigma_rel) is reconstructed from the run's snapshots (`checkpoints/posthoc_ema`) at its last
step and scored as the run's own weights are, beside the raw weights and the fixed-decay EMA of `last.ckpt`:
- val/loss: training's held-out loss (`DiffusionModule.validation_step`: fixed timesteps, noise seeded by each
  sample's key) on the run's `data.val_urls`;
- adherence: the synthetic data's judge on `--seeds` images per quickstart prompt, seen and held-out prompts.
The fixed-decay EMA's own width is computed from its weights over the steps (stage.ema_decay with CompVis' warm-up).
Results go to bench/results/posthoc_ema.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from quickstart import HELD_OUT_PROMPTS, SEEN_PROMPTS  # noqa: E402

from bench.samplers import _percent, adherence  # noqa: E402
from ldm.training.posthoc_ema import find_snapshots, reconstruct_widths  # noqa: E402
from ldm.training.run import build_module  # noqa: E402
from ldm.utils.checkpoint import load_bundle  # noqa: E402


def fixed_decay_width(decay: float, warmup: bool, steps: int) -> float:
    """sigma_rel of `EMA(decay, warmup)` after `steps` updates: the standard deviation of its weights over the steps
    (the share of step τ is (1 − d_τ) Π_{s>τ} d_s), divided by the number of steps."""
    n = np.arange(steps, dtype=np.float64)  # updates before step τ = n + 1
    d = np.minimum(decay, (1 + n) / (10 + n)) if warmup else np.full(steps, decay)
    after = np.concatenate([np.cumprod(d[::-1])[::-1][1:], [1.0]])  # Π of the later steps' decays
    share = (1 - d) * after
    share /= share.sum()
    tau = n + 1
    mean = (share * tau).sum()
    return float(np.sqrt((share * (tau - mean) ** 2).sum()) / steps)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", required=True, help="the run dir (checkpoints/last.ckpt, checkpoints/posthoc_ema)"
    )
    parser.add_argument(
        "--widths", default="0.02,0.035,0.05,0.075,0.1,0.15,0.2,0.25", help="'': the run's own weights only"
    )
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt")
    parser.add_argument("--guidance", type=float, default=2.5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "posthoc_ema.json"))
    args = parser.parse_args()

    last = Path(args.run) / "checkpoints" / "last.ckpt"
    bundle, ckpt = load_bundle(last)
    cfg = OmegaConf.create(bundle["config"])
    with open_dict(cfg):
        cfg.data.num_workers = 0
        cfg.data.persistent_workers = False
    module = build_module(cfg)
    module.complete_state_dict(ckpt["state_dict"])
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    datamodule = instantiate(cfg.data)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    sampler = instantiate(cfg.sampler)
    prompts = [p for p in SEEN_PROMPTS + HELD_OUT_PROMPTS for _ in range(args.seeds)]
    seeds = [i % args.seeds for i in range(len(prompts))]
    widths = [float(w) for w in args.widths.split(",") if w]  # none: score the run's own weights only
    snapshots = find_snapshots(Path(args.run) / "checkpoints" / "posthoc_ema") if widths else []
    steps = int(ckpt["global_step"])
    stage = cfg.stage

    def score(label: str, width: float | None, fit: float | None, use_ema: bool) -> dict:
        module.val_use_ema = use_ema
        (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        torch.manual_seed(0)
        images = module.generate(prompts, sampler, args.guidance, seeds, use_ema=use_ema)
        row = {
            "weights": label,
            "sigma_rel": width,
            "fit_error": fit,
            "val_loss": float(metrics["val/loss"]),
            "adherence": adherence(images, prompts, set(HELD_OUT_PROMPTS)),
        }
        print(f"{label:>28}  val/loss {row['val_loss']:.4f}  {row['adherence']}", flush=True)
        return row

    rows = [
        score("raw", None, None, use_ema=False),
        score(
            f"EMA decay {stage.ema_decay}" + (" + warm-up" if stage.ema_warmup else ""),
            fixed_decay_width(stage.ema_decay, stage.ema_warmup, steps),
            None,
            use_ema=True,
        ),
    ]
    reconstructed, end = reconstruct_widths(snapshots, widths) if widths else ([], None)
    for width, (unet, fit) in zip(widths, reconstructed, strict=True):
        module.ema.module.load_state_dict(unet)
        rows.append(score(f"post-hoc, step {end.step}", width, fit.residual, use_ema=True))

    result = {
        "run": str(args.run),
        "steps": steps,
        "snapshots": [s.step for s in snapshots],
        "images_per_prompt": args.seeds,
        "guidance_scale": args.guidance,
        "sampler": OmegaConf.to_container(cfg.sampler),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        "\n| weights | sigma_rel | profile fit error | val/loss | seen: colour / bg / shape | held-out: colour / bg / shape |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        width = "" if r["sigma_rel"] is None else f"{r['sigma_rel']:.3f}"
        fit = "" if r["fit_error"] is None else f"{100 * r['fit_error']:.1f} %"
        print(
            f"| {r['weights']} | {width} | {fit} | {r['val_loss']:.4f} | {_percent(r['adherence']['seen'])} "
            f"| {_percent(r['adherence']['held-out'])} |"
        )


if __name__ == "__main__":
    main()
