"""Sample a trained model: `python sample.py ckpt=runs/.../last.ckpt prompts='[a red circle on a blue background]'`.

Modes (see docs/sampling.md): txt2img, img2img, inpaint, outpaint, variations; `reproduce=<png>` rebuilds an image
from its metadata. Several checkpoints (`ckpt='runs/x/checkpoints/weights/*.ckpt'` or a list) are sampled alike, each
into `out_dir/<name>/`, and compared in `out_dir/compare.png`.
"""

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import ldm.utils.hydra_build  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ldm.sampling import reproduce_settings, write_comparison
    from ldm.utils.checkpoint import checkpoint_names, checkpoint_paths

    batch = None
    if cfg.reproduce:
        settings = reproduce_settings(cfg.reproduce)
        batch = settings.pop("batch")
        cfg = OmegaConf.merge(cfg, {k: v for k, v in settings.items() if k != "sampler"})
        cfg.sampler = settings["sampler"]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    paths = checkpoint_paths(cfg.ckpt)
    if len(paths) > 1:
        if batch:
            raise ValueError("reproduce= rebuilds an image of one checkpoint; ckpt names several")
        names = checkpoint_names(paths)
        for path, name in zip(paths, names, strict=True):
            _sample(cfg, path, device, f"{cfg.out_dir}/{name}")
        compare = write_comparison(cfg.out_dir, names, paths)
        print(f"comparison of {len(paths)} checkpoints written to {compare}")
        return
    _sample(cfg, paths[0], device, cfg.out_dir, batch)


def _sample(cfg: DictConfig, ckpt: str, device: str, out_dir: str, batch: dict | None = None) -> None:
    from ldm.inference import TextToImage, read_prompts
    from ldm.sampling import generate, late_start_warning, prepare_job, write_samples
    from ldm.utils.images import save_png, to_pil

    pipe, bundle = TextToImage.from_checkpoint(ckpt, use_ema=cfg.use_ema, device=device)
    print(f"{ckpt}: {_weights_used(bundle, cfg.use_ema)}")
    if cfg.guide_ckpt:
        pipe.load_guide(cfg.guide_ckpt)
    sampler = instantiate(cfg.sampler)
    if warning := late_start_warning(pipe.diffusion, sampler):
        print(f"warning: {warning}")
    prompts = (
        batch["prompts"]
        if batch
        else ([] if cfg.mode == "variations" else read_prompts(cfg.prompts, cfg.prompts_file))
    )
    job = prepare_job(
        pipe,
        prompts,
        mode=cfg.mode,
        init_image=cfg.init_image,
        mask=cfg.mask,
        strength=cfg.strength,
        outpaint=OmegaConf.to_container(cfg.outpaint),
        variations_of=cfg.variations_of,
        cell=cfg.cell,
        seed=cfg.seed,
        height=cfg.height,
        width=cfg.width,
    )
    if batch:  # one image, from the batch it was first sampled in
        images = generate(
            pipe,
            job,
            sampler,
            batch["prompts"],
            batch["seeds"],
            cfg.guidance_scale,
            cfg.guidance_rescale,
            cfg.negative_prompt,
            cfg.guidance_interval,
        )
        path = save_png(
            to_pil(images[batch["index"]].cpu()),
            f"{out_dir}/reproduced.png",
            {"reproduces": str(cfg.reproduce)},
        )
        print(f"image written to {path}")
        return
    extra = {
        "checkpoint": str(ckpt),
        "use_ema": cfg.use_ema,
        "guide_ckpt": cfg.guide_ckpt,
        "device": torch.device(device).type,  # a stochastic sampler's image depends on it (docs/sampling.md)
    }
    if "posthoc_ema" in bundle:
        extra["posthoc_ema_sigma_rel"] = bundle["posthoc_ema"]["sigma_rel"]
    grid = write_samples(
        pipe,
        job,
        sampler=sampler,
        out_dir=out_dir,
        num_per_prompt=cfg.num_per_prompt,
        grid_cols=cfg.grid_cols,
        guidance_scale=cfg.guidance_scale,
        guidance_rescale=cfg.guidance_rescale,
        height=cfg.height,
        width=cfg.width,
        batch_size=cfg.batch_size,
        negative_prompt=cfg.negative_prompt,
        guidance_interval=cfg.guidance_interval,
        extra_metadata=extra,
    )
    print(f"grid written to {grid}")


def _weights_used(bundle: dict, use_ema: bool) -> str:
    """Which UNet weights sampling uses, in words."""
    if not use_ema:
        return "raw (non-EMA) UNet weights"
    if "posthoc_ema" in bundle:
        made = bundle["posthoc_ema"]
        return f"post-hoc EMA UNet weights (sigma_rel {made['sigma_rel']:g}, step {made['step']})"
    return "EMA UNet weights"


if __name__ == "__main__":
    main()
