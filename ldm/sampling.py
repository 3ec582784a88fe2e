"""What `sample.py` does: txt2img, img2img, inpaint, outpaint and variations; a 2×2 grid per prompt (captions
under each row) and an overview grid; every PNG carries the settings that reproduce it (`sample.py reproduce=`).

Never imports `ldm.training`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm.diffusion import DDIMSampler, DDPMSampler
from ldm.inference import TextToImage
from ldm.utils.images import labelled_grid, read_png_metadata, save_png, to_pil

MODES = ("txt2img", "img2img", "inpaint", "outpaint", "variations")
DEFAULT_STRENGTH = {"txt2img": 1.0, "img2img": 0.75, "inpaint": 1.0, "outpaint": 1.0, "variations": 0.6}
SIDES = ("left", "right", "top", "bottom")


def file_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Tensor:
    """RGB image → (1, 3, H, W) float in [0, 1], resized (bicubic) to size = (H, W) when given."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        array = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def load_mask(path: str | os.PathLike, size: tuple[int, int]) -> Tensor:
    """Grey-scale mask → (1, 1, H, W) in {0, 1}: white (> 50 %) = repaint, black = keep."""
    with Image.open(path) as im:
        im = im.convert("L").resize((size[1], size[0]), Image.NEAREST)
        array = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(array > 0.5).float()[None, None]


def outpaint_canvas(image: Tensor, pad: Mapping[str, int], multiple: int = 1) -> tuple[Tensor, Tensor]:
    """Extend (1, 3, H, W) by pad[side] pixels on each side: the new border repeats the edge pixels (a neutral
    start for the encoder) and is masked 1 (repaint); the original is masked 0 (kept)."""
    unknown = set(pad) - set(SIDES)
    if unknown:
        raise ValueError(f"outpaint sides must be among {SIDES}, got {sorted(unknown)}")
    left, right, top, bottom = (int(pad.get(side, 0)) for side in SIDES)
    if min(left, right, top, bottom) < 0 or not any((left, right, top, bottom)):
        raise ValueError(f"outpaint needs a positive number of pixels on at least one side, got {dict(pad)}")
    bad = {s: p for s, p in zip(SIDES, (left, right, top, bottom), strict=True) if p % multiple}
    if bad:
        raise ValueError(
            f"outpaint pixels must be multiples of {multiple} (latent size constraint), got {bad}"
        )
    canvas = torch.nn.functional.pad(image, (left, right, top, bottom), mode="replicate")
    mask = torch.ones(1, 1, *canvas.shape[-2:])
    mask[..., top : top + image.shape[-2], left : left + image.shape[-1]] = 0
    return canvas, mask


@dataclass
class Job:
    """One sample.py run: the prompts, and for the editing modes the image, mask and strength."""

    prompts: list[str]
    mode: str = "txt2img"
    image: Tensor | None = None
    mask: Tensor | None = None
    strength: float = 1.0
    seed: int = 0
    settings: dict = field(default_factory=dict)  # what goes into every PNG's metadata to reproduce it
    size: tuple[int, int] | None = None  # txt2img: (height, width), any multiple of the latent grid


def prepare_job(
    pipe: TextToImage,
    prompts: Sequence[str],
    mode: str = "txt2img",
    init_image: str | None = None,
    mask: str | None = None,
    strength: float | None = None,
    outpaint: Mapping[str, int] | None = None,
    variations_of: str | None = None,
    cell: int = 0,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
) -> Job:
    """Load and check the inputs of a mode. Image inputs are resized to height × width (default: the model's
    training resolution); outpaint then extends that canvas."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    size = (height or pipe.image_size[0], width or pipe.image_size[1])
    strength = DEFAULT_STRENGTH[mode] if strength is None else float(strength)
    settings = {"mode": mode, "strength": strength}
    if mode == "txt2img":
        return Job(list(prompts), mode, seed=seed, settings=settings, size=size)
    if mode == "variations":
        if not variations_of:
            raise ValueError("mode=variations needs variations_of=<a PNG written by sample.py>")
        path, meta = _variation_parent(variations_of, cell)
        # a variation is img2img from the parent image, with new seeds; recorded as such, so it reproduces alone
        prompts, seed = [meta["prompt"]], int(meta["seed"]) + 1 + seed
        mode, init_image, size = "img2img", str(path), (meta["height"], meta["width"])
        settings = {"mode": mode, "strength": strength, "variation_of": str(path)}
    if not init_image:
        raise ValueError(f"mode={mode} needs init_image=<path to an image>")
    image = load_image(init_image, size)
    settings.update(init_image=str(init_image), init_image_sha256=file_digest(init_image))
    mask_tensor = None
    if mode == "inpaint":
        if not mask:
            raise ValueError("mode=inpaint needs mask=<path to a mask image> (white = repaint, black = keep)")
        mask_tensor = load_mask(mask, size)
        settings.update(mask=str(mask), mask_sha256=file_digest(mask))
    if mode == "outpaint":
        multiple = pipe.codec.autoencoder.downsample_factor * pipe.unet.downsample_factor
        image, mask_tensor = outpaint_canvas(image, outpaint or {}, multiple)
        settings.update(outpaint={s: int((outpaint or {}).get(s, 0)) for s in SIDES})
    return Job(list(prompts), mode, image, mask_tensor, strength, seed, settings)


def _variation_parent(path: str | os.PathLike, cell: int) -> tuple[Path, dict]:
    """The image a variation starts from: a per-image PNG, or cell `cell` of a per-prompt grid PNG."""
    path = Path(path)
    meta = read_png_metadata(path)
    if "cells" in meta:  # a per-prompt grid: pick the cell
        if not 0 <= cell < len(meta["cells"]):
            raise ValueError(f"cell must be in [0, {len(meta['cells'])}), got {cell}")
        path = path.parent / meta["cells"][cell]
        meta = read_png_metadata(path)
    if "prompt" not in meta or "seed" not in meta:
        raise ValueError(f"{path} has no sample.py metadata (prompt, seed)")
    return path, meta


def sampler_config(sampler) -> dict:
    """An instantiable description of a sampler: its class path and plain settings (num_steps, eta, …)."""
    settings = {k: v for k, v in vars(sampler).items() if isinstance(v, int | float | str | bool | None)}
    return {"_target_": f"{type(sampler).__module__}.{type(sampler).__qualname__}", **settings}


def late_start_warning(diffusion, sampler) -> str | None:
    """A warning when `sampler` starts below pure noise on a process whose last step is pure noise (zero terminal
    SNR, rectified flow): DDIM/DDPM grids that never visit t = T - 1 ("leading" spacing, Lin et al. 2024 sec. 3.3)
    then treat the initial noise as a slightly noisy image. None when the start is right."""
    timesteps = getattr(sampler, "timesteps", None)
    if not isinstance(sampler, DDIMSampler | DDPMSampler) or timesteps is None:
        return None  # the k-samplers start at sigma_max on purpose
    last = diffusion.num_timesteps - 1
    first = timesteps(diffusion.num_timesteps)[0]
    if float(diffusion.alphas_cumprod[-1]) > 0 or first == last:
        return None
    return (
        f"{type(sampler).__name__} starts at t = {first}, but this model's t = {last} is pure noise "
        "(zero terminal SNR or rectified flow): sample with sampler=euler, or sampler.timestep_spacing=trailing"
    )


def write_samples(
    pipe: TextToImage,
    job: Job,
    sampler: Callable,
    out_dir: str | os.PathLike,
    num_per_prompt: int = 4,
    grid_cols: int = 2,
    guidance_scale: float = 5.0,
    guidance_rescale: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 16,
    negative_prompt: str = "",
    extra_metadata: dict | None = None,
    guidance_interval: Sequence[float] | None = None,
) -> Path:
    """One PNG per image, a `grid_cols`-wide grid per prompt (`grids/NNN.png`, 2×2 by default, its row's seeds
    and the prompt under each row) and an overview `grid.png` (a row per prompt); returns the overview's path.

    Image j of every prompt starts from the noise of seed `job.seed + j`, whatever the other prompts; the step noise
    of stochastic samplers comes from one generator per batch (seeded from its first seed), so with those an image
    depends on its batch, which the metadata records.
    Each PNG's metadata holds the settings and the batch it was sampled in, from which `reproduce` rebuilds it.
    """
    out_dir = Path(out_dir)
    if job.image is not None:
        height, width = job.image.shape[-2:]
    height, width = height or pipe.image_size[0], width or pipe.image_size[1]
    jobs = [(i, p, job.seed + j) for i, p in enumerate(job.prompts) for j in range(num_per_prompt)]
    settings = {
        **job.settings,
        "steps": getattr(sampler, "num_steps", None) or pipe.diffusion.num_timesteps,
        "guidance_scale": guidance_scale,
        "guidance_rescale": guidance_rescale,
        "guidance_interval": None if guidance_interval is None else [float(v) for v in guidance_interval],
        "negative_prompt": negative_prompt,
        "sampler": type(sampler).__name__,
        "sampler_config": sampler_config(sampler),
        "height": height,
        "width": width,
        **(extra_metadata or {}),
    }
    images, names = [], []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        batch = generate(
            pipe,
            job,
            sampler,
            [p for _, p, _ in chunk],
            [s for *_, s in chunk],
            guidance_scale,
            guidance_rescale,
            negative_prompt,
            guidance_interval,
        )
        for k, ((i, prompt, s), image) in enumerate(zip(chunk, batch.cpu(), strict=True)):
            name = f"{i:03d}_{s:06d}.png"
            meta = {
                "prompt": prompt,
                "seed": s,
                **settings,
                "batch": {"prompts": [p for _, p, _ in chunk], "seeds": [x for *_, x in chunk], "index": k},
            }
            save_png(to_pil(image), out_dir / "images" / name, meta)
            images.append(image)
            names.append(name)
    for i, prompt in enumerate(job.prompts):
        cells = slice(i * num_per_prompt, (i + 1) * num_per_prompt)
        seeds = [s for *_, s in jobs[cells]]
        rows = [seeds[r : r + grid_cols] for r in range(0, len(seeds), grid_cols)]
        captions = [f"{prompt}  (seeds {', '.join(map(str, row))})" for row in rows]
        grid = labelled_grid(torch.stack(images[cells]), grid_cols, captions)
        cell_names = [f"../images/{n}" for n in names[cells]]
        save_png(
            grid,
            out_dir / "grids" / f"{i:03d}.png",
            {"prompt": prompt, "seeds": seeds, "cells": cell_names, **settings},
        )
    overview = labelled_grid(torch.stack(images), num_per_prompt, list(job.prompts))
    return save_png(
        overview, out_dir / "grid.png", {"prompts": list(job.prompts), "seed": job.seed, **settings}
    )


def write_comparison(out_dir: str | os.PathLike, names: Sequence[str], checkpoints: Sequence[str]) -> Path:
    """`out_dir/compare.png`: a row per checkpoint (`out_dir/<name>/images/`, as `write_samples` wrote them, the
    same prompts and seeds for each), labelled with its name, for telling checkpoints apart at a glance."""
    out_dir = Path(out_dir)
    files = [sorted((out_dir / name / "images").glob("*.png")) for name in names]
    if len({tuple(f.name for f in row) for row in files}) != 1:
        raise ValueError("the checkpoints' samples differ in prompts or seeds; nothing to compare row by row")
    images = [
        torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1) / 255
        for row in files
        for f in row
    ]
    grid = labelled_grid(torch.stack(images), len(files[0]), list(names))
    first = read_png_metadata(files[0][0]) if files[0] else {}
    meta = {
        "checkpoints": [str(c) for c in checkpoints],
        "rows": list(names),
        "cells": [f.name for f in files[0]],
        **{k: first[k] for k in ("sampler", "steps", "guidance_scale", "height", "width") if k in first},
    }
    return save_png(grid, out_dir / "compare.png", meta)


def generate(
    pipe: TextToImage,
    job: Job,
    sampler: Callable,
    prompts: list[str],
    seeds: list[int],
    guidance_scale: float,
    guidance_rescale: float,
    negative_prompt: str = "",
    guidance_interval: Sequence[float] | None = None,
) -> Tensor:
    height, width = job.size if job.image is None and job.size else (None, None)
    return pipe(
        prompts,
        sampler,
        guidance_scale,
        seeds,
        height=height,
        width=width,
        guidance_rescale=guidance_rescale,
        init_image=job.image,
        strength=job.strength,
        mask=job.mask,
        negative_prompt=negative_prompt,
        guidance_interval=guidance_interval,
    )


# the sample.yaml keys that an image's metadata sets when it is reproduced
REPRODUCED_KEYS = (
    "mode",
    "strength",
    "init_image",
    "mask",
    "outpaint",
    "guidance_scale",
    "guidance_rescale",
    "guidance_interval",
    "negative_prompt",
    "guide_ckpt",
    "height",
    "width",
    "use_ema",
)


def reproduce_settings(path: str | os.PathLike) -> dict:
    """sample.yaml overrides that rebuild the PNG at `path`: its settings, sampler config, checkpoint, and the
    batch it was sampled in (prompts and seeds: stochastic samplers draw their step noise per batch)."""
    meta = read_png_metadata(path)
    if "batch" not in meta or "sampler_config" not in meta:
        raise ValueError(
            f"{path}: not a per-image PNG written by sample.py (no batch / sampler_config metadata)"
        )
    for key, digest_key in (("init_image", "init_image_sha256"), ("mask", "mask_sha256")):
        if meta.get(key) and file_digest(meta[key]) != meta[digest_key]:
            raise ValueError(f"{meta[key]} has changed since {path} was made from it (sha256 differs)")
    out = {k: meta[k] for k in REPRODUCED_KEYS if k in meta}
    if (
        out.get("mode") == "outpaint"
    ):  # the stored size is the extended canvas; the image went in at its own size
        pad = meta["outpaint"]
        out["height"] -= pad["top"] + pad["bottom"]
        out["width"] -= pad["left"] + pad["right"]
    out.update(ckpt=meta["checkpoint"], sampler=meta["sampler_config"], batch=meta["batch"])
    return out
