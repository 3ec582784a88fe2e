"""CPU quickstart: synthetic captioned shards → stage 1 (tiny VAE) → stage 2 (tiny LDM) → a grid of samples.

Runs the same commands a user would (`train.py`, `sample.py`), printing each one, then scores the samples with
the synthetic data's colour/shape judge (held-out colour/shape pairs reported separately).
Usage: `bash scripts/quickstart.sh [--out quickstart_out] [--vae-steps N] [--ldm-steps N] [--num-samples N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# colour/shape pairs of the second list never occur in the training shards (ldm.data.synthetic.DEFAULT_HOLDOUT)
SEEN_PROMPTS = [
    "a red circle on a blue background",
    "a green triangle on a white background",
    "a yellow square on a black background",
    "a blue circle on a yellow background",
]
HELD_OUT_PROMPTS = [
    "a red triangle on a white background",
    "a blue star on a yellow background",
    "a yellow circle on a purple background",
    "a green square on a black background",
]


# written into the output folder: the clean-up in main() only ever runs in a folder with it
MARK = ".quickstart_out"


def check_out_folder(out: Path, mark: bool = False) -> None:
    """Exit unless `out` is absent, empty or a quickstart's own output folder (the clean-up removes its vae/, ldm/,
    samples/ and data/latents: in any other folder, `--out .` above all, they are not the quickstart's to remove).
    A folder with an earlier quickstart's shards, written before the mark existed, counts as its own."""
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARK).is_file() and not (out / "data" / "train" / "shapes-000000.tar").is_file():
            sys.exit(
                f"--out {out} is not a quickstart output folder (it holds other files, and the quickstart "
                "replaces its vae/, ldm/, samples/ and data/ subfolders): pass a new or empty folder"
            )
    elif out.exists() and not out.is_dir():
        sys.exit(f"--out {out} is not a folder")
    if mark:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARK).write_text(
            "written by scripts/quickstart.py; its next run may replace this folder's contents\n"
        )


def run(cmd: list[str], label: str, timings: dict) -> None:
    print(f"\n=== {label}\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:  # stop here: later steps read this one's outputs
        sys.exit(
            f"=== quickstart failed at step '{label}' (exit status {result.returncode}); its output is above"
        )
    timings[label] = round(time.perf_counter() - start, 1)
    print(f"=== {label}: {timings[label]:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="quickstart_out", help="output folder (data, runs, samples)")
    parser.add_argument("--num-samples", type=int, default=10000, help="synthetic training images")
    parser.add_argument(
        "--num-val", type=int, default=512, help="held-out images (stage-1 PSNR/SSIM, stage-2 val/loss)"
    )
    parser.add_argument(
        "--vae-steps", type=int, default=None, help="override stage-1 steps (experiment vae_tiny)"
    )
    parser.add_argument(
        "--ldm-steps", type=int, default=None, help="override stage-2 steps (experiment tiny)"
    )
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps when sampling")
    parser.add_argument(
        "--guidance", type=float, default=2.5, help="classifier-free guidance scale when sampling"
    )
    parser.add_argument(
        "--templates",
        type=int,
        nargs="+",
        default=[0],
        help="caption templates of the synthetic data (default: one phrasing, which the random text tower "
        "binds far sooner than five; docs/benchmarks.md)",
    )
    parser.add_argument("--logger", default="wandb", choices=["wandb", "csv"], help="training logger")
    args = parser.parse_args()

    from ldm.data.synthetic import judge, parse_caption, write_synthetic_shards

    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    check_out_folder(out, mark=True)
    timings: dict[str, float] = {}
    total_start = time.perf_counter()
    py = sys.executable

    print(
        f"=== writing {args.num_samples} synthetic captioned images (+ {args.num_val} held out) as shards "
        f"under {out / 'data'}",
        flush=True,
    )
    start = time.perf_counter()
    train_shards = write_synthetic_shards(
        out / "data" / "train", args.num_samples, samples_per_shard=2000, templates=args.templates
    )
    write_synthetic_shards(
        out / "data" / "val",
        args.num_val,
        samples_per_shard=args.num_val,
        seed=1,
        prefix="val",
        templates=args.templates,
    )
    timings["data"] = round(time.perf_counter() - start, 1)
    urls = f"{out / 'data' / 'train'}/shapes-{{000000..{len(train_shards) - 1:06d}}}.tar"
    # the W&B runs stay offline under the output folder even with an API key configured (README, docs/dashboards.md)
    logger = [f"logger={args.logger}", *(["logger.offline=true"] if args.logger == "wandb" else [])]

    vae_dir, cache_dir, val_cache_dir, ldm_dir, sample_dir = (
        out / "vae",
        out / "data" / "latents",
        out / "data" / "val_latents",
        out / "ldm",
        out / "samples",
    )
    vae_ckpt = vae_dir / "checkpoints" / "last.ckpt"
    # a run dir with checkpoints resumes from them (and one at max_steps trains no further): each quickstart starts
    # its stages anew, as the data above was written anew
    for previous in (vae_dir, cache_dir, val_cache_dir, ldm_dir, sample_dir):
        if previous.exists():
            print(f"=== removing the previous quickstart's {previous}", flush=True)
            shutil.rmtree(previous)
    vae = [
        py,
        "train.py",
        "experiment=vae_tiny",
        f"hydra.run.dir={vae_dir}",
        f'data.train_urls="{urls}"',
        f"data.val_urls={out / 'data' / 'val'}",
        *logger,
    ]
    if args.vae_steps:
        vae += [f"trainer.max_steps={args.vae_steps}", f"stage.loss.disc_start={args.vae_steps * 3 // 4}"]
    run(vae, "stage 1: autoencoder", timings)

    # encode every training image once: stage 2 then trains on latents, without the autoencoder in its loop
    cache = [
        py,
        "scripts/cache_latents.py",
        f"autoencoder_ckpt={vae_ckpt}",
        f'urls="{urls}"',
        f"out_dir={cache_dir}",
        "num_workers=1",
    ]
    run(cache, "caching latents", timings)
    val_cache = [*cache[:3], f"urls={out / 'data' / 'val'}", f"out_dir={val_cache_dir}", "num_workers=1"]
    run(val_cache, "caching held-out latents", timings)  # stage 2's held-out loss (val/loss)

    ldm = [
        py,
        "train.py",
        "experiment=tiny",
        "data=latents",
        f"hydra.run.dir={ldm_dir}",
        f"data.train_urls={cache_dir}",
        f"data.val_urls={val_cache_dir}",
        *logger,
    ]
    if args.ldm_steps:  # and the held-out loss twice, as the full run's 4 times in 1100 steps
        ldm += [
            f"trainer.max_steps={args.ldm_steps}",
            f"trainer.val_check_interval={max(1, args.ldm_steps // 2)}",
        ]
    run(ldm, "stage 2: latent diffusion", timings)

    held_out = HELD_OUT_PROMPTS
    seen = SEEN_PROMPTS
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("\n".join(seen + held_out) + "\n")
    run(
        [
            py,
            "sample.py",
            f"ckpt={ldm_dir / 'checkpoints' / 'last.ckpt'}",
            f"prompts_file={prompts_file}",
            f"out_dir={sample_dir}",
            f"sampler.num_steps={args.sample_steps}",
            f"guidance_scale={args.guidance}",  # SD's 5 overshoots this model's colours (docs/benchmarks.md)
            "num_per_prompt=4",
        ],
        "sampling",
        timings,
    )

    scores = score_samples(sample_dir / "images", judge, parse_caption, set(held_out))
    timings["total"] = round(time.perf_counter() - total_start, 1)
    summary = {"timings_s": timings, "scores": scores, "grid": str(sample_dir / "grid.png")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n=== quickstart summary")
    for label, seconds in timings.items():
        print(f"  {label:<28} {seconds:7.1f} s")
    for group, acc in scores.items():
        print(f"  {group:<9} " + "  ".join(f"{k} {v:.0%}" for k, v in acc.items()))
    print(f"\nDone. The grid of samples is at {sample_dir / 'grid.png'}")


def score_samples(image_dir: Path, judge, parse_caption, held_out: set[str]) -> dict:
    """Share of samples whose background colour, shape colour and shape match the prompt, seen vs held-out."""
    from PIL import Image

    from ldm.utils.images import read_png_metadata

    tallies: dict[str, dict[str, list[bool]]] = {"seen": {}, "held-out": {}}
    for path in sorted(image_dir.glob("*.png")):
        prompt = read_png_metadata(path)["prompt"]
        spec = parse_caption(prompt)
        if spec is None:
            continue
        with Image.open(path) as im:
            verdict = judge(im.convert("RGB"), spec)
        group = tallies["held-out" if prompt in held_out else "seen"]
        for key, ok in verdict.items():
            group.setdefault(key, []).append(bool(ok))
    return {g: {k: sum(v) / len(v) for k, v in t.items()} for g, t in tallies.items() if t}


if __name__ == "__main__":
    main()
