"""Stage-2 training throughput on cached latents vs raw images: same UNet, text encoder, batch and Trainer.

    python bench/cached_vs_raw.py                       # the CPU set: tiny (32 px) and SD-VAE f8 at 256 px
    python bench/cached_vs_raw.py --cases sd2_256 --steps 20   # the SD2-size UNet (GPU)

Raw: JPEG shards → decode + crop (DataLoader workers) → autoencoder encode → text encode → UNet step.
Cached: cached-latent shards (scripts/cache_latents.py) → text encode → UNet step. Images/s is measured over
`--steps` steps after `--warmup` steps, with a callback timing whole training steps in the real Trainer.
Results: a JSON file and a row per case appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]

# name: (resolution, autoencoder option, unet overrides, batch size, images in the shards)
CASES: dict[str, dict] = {
    "tiny_32": {
        "resolution": 32,
        "autoencoder": "kl_f4_tiny",
        "unet": "tiny",
        "unet_overrides": [],
        "batch": 64,
    },
    "mid_256": {
        "resolution": 256,
        "autoencoder": "kl_f8",
        "unet": "tiny",
        "unet_overrides": [
            "unet.model_channels=128",
            "unet.channel_mult=[1,2,4]",
            "unet.attention_resolutions=[2,4]",
            "unet.num_res_blocks=1",
            "unet.head_dim=64",
        ],
        "batch": 4,
    },
    "sd2_256": {
        "resolution": 256,
        "autoencoder": "kl_f8",
        "unet": "sd2_base",
        "unet_overrides": [],
        "batch": 8,
    },
}


class StepTimer(L.Callback):
    """Wall time of training steps after `warmup`; on CUDA, synchronised at the step boundaries."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if batch_idx + 1 == self.warmup:
            self.start = now
        elif batch_idx + 1 > self.warmup:
            self.end, self.steps = now, self.steps + 1


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


def run_case(name: str, case: dict, steps: int, warmup: int, workers: int, work: Path) -> dict:
    from ldm.data.synthetic import write_synthetic_shards
    from ldm.inference import load_autoencoder
    from ldm.latent_cache import cache_info, cache_latents
    from ldm.models import KLAutoencoder
    from ldm.training.run import train
    from ldm.utils.checkpoint import atomic_save
    from ldm.utils.hydra_build import to_plain
    from ldm.utils.sd_import import stage1_checkpoint

    res, batch = case["resolution"], case["batch"]
    images = work / "images"
    n = batch * (steps + warmup + 2)
    write_synthetic_shards(images, n, samples_per_shard=max(batch, n // 4), resolution=res, seed=0)
    ae_cfg = to_plain(_compose([f"autoencoder={case['autoencoder']}", "data.train_urls=x"]).autoencoder)
    arch = {k: v for k, v in ae_cfg.items() if k != "_target_"}
    ae_ckpt = work / "vae.ckpt"
    torch.manual_seed(0)
    atomic_save(
        stage1_checkpoint(arch, KLAutoencoder(**arch).state_dict(), latent_scale=1.0, resolution=res), ae_ckpt
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    autoencoder, bundle = load_autoencoder(ae_ckpt, device)
    start = time.perf_counter()
    report = cache_latents(
        autoencoder,
        str(images),
        work / "latents",
        res,
        batch_size=batch,
        num_workers=workers,
        info=cache_info(ae_ckpt, bundle, res, "center", None, str(images), autoencoder),
        progress=False,
    )
    cache_s = time.perf_counter() - start
    del autoencoder

    common = [
        "experiment=tiny",
        f"unet={case['unet']}",
        *case["unet_overrides"],
        f"autoencoder_ckpt={ae_ckpt}",
        f"data.resolution={res}",
        f"data.batch_size={batch}",
        f"data.num_workers={workers}",
        "data.shuffle_buffer=0",
        "~logger",
        *(f"callbacks.{name}=null" for name in ("model_checkpoint", "sample_grid", "lr_monitor")),
        f"trainer.max_steps={steps + warmup}",
        "trainer.enable_progress_bar=false",
        "optim.warmup_steps=1",
    ]
    result = {
        "case": name,
        "resolution": res,
        "batch": batch,
        "steps": steps,
        "cache_images_per_s": report.samples / cache_s,
    }
    for kind, data in (
        ("raw", ["data=webdataset", f"data.train_urls={images}"]),
        ("cached", ["data=latents", f"data.train_urls={work / 'latents'}"]),
    ):
        cfg = _compose([*common, *data, f"run_dir={work / kind}"])
        timer = StepTimer(warmup)
        train(cfg, extra_callbacks=[timer])
        result[f"{kind}_images_per_s"] = timer.steps * batch / (timer.end - timer.start)
    result["speedup"] = result["cached_images_per_s"] / result["raw_images_per_s"]
    unet_params = sum(p.numel() for p in _unet(cfg).parameters())
    result["unet_params_M"] = round(unet_params / 1e6, 1)
    return result


def _unet(cfg):
    from ldm.utils.hydra_build import build_denoising_parts

    return build_denoising_parts(cfg)["unet"]


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import os

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="tiny_32,mid_256", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps (at least 1: the clock starts when one ends)"
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (decoding the raw images)")
    parser.add_argument("--json", default="bench/results/cached_vs_raw.json")
    parser.add_argument("--markdown", default="docs/benchmarks.md", help="append a table here ('' to skip)")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the clock starts at the end of a step)")

    results = []
    for name in args.cases.split(","):
        with tempfile.TemporaryDirectory() as work:
            results.append(run_case(name, CASES[name], args.steps, args.warmup, args.workers, Path(work)))
        print(json.dumps(results[-1]), flush=True)
    meta = {"machine": machine(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    out = ROOT / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    if args.markdown:
        rows = [
            f"| {r['case']} | {r['resolution']} | {r['unet_params_M']} | {r['batch']} | {r['raw_images_per_s']:.2f} "
            f"| {r['cached_images_per_s']:.2f} | **{r['speedup']:.2f}×** | {r['cache_images_per_s']:.1f} |"
            for r in results
        ]
        table = "\n".join(
            [
                f"\n### Stage 2: cached latents vs raw images — {meta['machine']}, torch {meta['torch']}, {meta['date']}\n",
                "`python bench/cached_vs_raw.py "
                + " ".join(
                    f"--{k} {v}"
                    for k, v in (("cases", args.cases), ("steps", args.steps), ("workers", args.workers))
                )
                + "`\n",
                "| case | px | UNet M params | batch | raw img/s | cached img/s | speed-up | caching img/s |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
                *rows,
            ]
        )
        with open(ROOT / args.markdown, "a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
