"""Measure a stage-1 autoencoder's latent statistics and store the latent scale in its checkpoint.

python scripts/latent_stats.py ckpt=runs/vae_laion_256/.../last.ckpt urls=/data/laion num_samples=10000
"""

import hydra
import torch
from omegaconf import DictConfig

import ldm.utils.hydra_build  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="latent_stats", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ldm.inference import load_autoencoder
    from ldm.latent_stats import image_batches, measure_latent_stats, store_latent_stats

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    autoencoder, bundle = load_autoencoder(cfg.ckpt, device)
    resolution = cfg.resolution or bundle["config"]["data"]["resolution"]
    batches = image_batches(cfg.urls, resolution, cfg.batch_size, device=device, seed=cfg.seed)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    stats = measure_latent_stats(autoencoder.encode, batches, cfg.num_samples, generator=generator)
    path = store_latent_stats(cfg.ckpt, stats, use_shift=cfg.use_shift, out=cfg.out)
    print(
        f"latent std {stats.std:.5f} → scale {stats.scale:.5f}, mean {stats.mean:+.5f} "
        f"over {stats.num_samples} images at {resolution} px; written to {path}"
    )


if __name__ == "__main__":
    main()
