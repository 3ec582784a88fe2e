"""Encode image shards into cached-latent shards for stage 2 (see configs/cache_latents.yaml).

python scripts/cache_latents.py autoencoder_ckpt=runs/vae/.../last.ckpt urls=/data/laion out_dir=/data/laion-latents
"""

import time

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

import ldm.utils.hydra_build  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="cache_latents", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ldm.inference import load_autoencoder
    from ldm.latent_cache import cache_info, cache_latents
    from ldm.utils.launcher import launcher_rank

    env_rank, env_world, local_rank = launcher_rank()
    rank = env_rank if cfg.rank is None else cfg.rank
    world_size = env_world if cfg.world_size is None else cfg.world_size
    device = cfg.device
    if device == "auto":
        device = f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    autoencoder, bundle = load_autoencoder(cfg.autoencoder_ckpt, device)
    resolution = cfg.resolution or bundle["config"]["data"]["resolution"]
    with open_dict(cfg):
        cfg.resolution = resolution  # what a filter preset's sizes (${..resolution}) read
    text_encoder = instantiate(cfg.text_encoder).to(device) if cfg.get("text_encoder") else None
    start = time.perf_counter()
    report = cache_latents(
        autoencoder,
        cfg.urls,
        cfg.out_dir,
        resolution,
        batch_size=cfg.batch_size,
        text_encoder=text_encoder,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        info=cache_info(
            cfg.autoencoder_ckpt, bundle, resolution, cfg.crop, text_encoder, cfg.urls, autoencoder
        ),
        crop=cfg.crop,
        buckets=cfg.buckets,
        filters=cfg.get("filters"),
        flips=cfg.flips,
    )
    seconds = time.perf_counter() - start
    print(
        f"rank {rank}/{world_size}: {report.shards_written} shards written ({report.samples} samples in "
        f"{seconds:.0f} s, {report.samples / max(seconds, 1e-9):.1f} img/s), {report.shards_skipped} already "
        f"complete, skipped samples {report.skipped_samples or 'none'}; cache in {cfg.out_dir}"
    )
    if cfg.buckets is not None and report.sizes:
        print(f"rank {rank}/{world_size}: images per bucket (h x w): {report.size_shares()}")


if __name__ == "__main__":
    main()
