"""Sample a trained model: `python sample.py ckpt=runs/.../last.ckpt prompts='[a red circle on a blue background]'`."""

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

import ldm.utils.hydra_build  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ldm.inference import TextToImage, read_prompts, write_samples

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    pipe, _ = TextToImage.from_checkpoint(cfg.ckpt, use_ema=cfg.use_ema, device=device)
    grid = write_samples(
        pipe,
        read_prompts(cfg.prompts, cfg.prompts_file),
        sampler=instantiate(cfg.sampler),
        out_dir=cfg.out_dir,
        num_per_prompt=cfg.num_per_prompt,
        guidance_scale=cfg.guidance_scale,
        seed=cfg.seed,
        height=cfg.height,
        width=cfg.width,
        batch_size=cfg.batch_size,
        extra_metadata={"checkpoint": str(cfg.ckpt), "use_ema": cfg.use_ema},
    )
    print(f"grid written to {grid}")


if __name__ == "__main__":
    main()
