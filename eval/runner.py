"""One evaluation of a checkpoint (or a guidance-scale sweep): generate, score, write the result with its protocol.

`Evaluator` holds the scorers of one protocol (Inception + reference statistics, CLIP model), built once and
reused for every guidance scale, and by the in-training callback for every evaluation step. `run_evaluation` is
the body of `eval/fid.py` and `eval/clip_score.py`: plain arguments in, JSON files (and a W&B summary) out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from eval.clip_score import DEFAULT_MODEL, DEFAULT_PRETRAINED, ClipScore
from eval.dinov2 import DINOv2Features, DINOv2Scorer
from eval.distributed import (
    DistContext,
    barrier,
    dist_context,
    init_distributed,
    is_distributed,
    resolve_device,
)
from eval.features import InceptionFeatures
from eval.fid import InceptionScorer
from eval.generate import (
    Captions,
    Generate,
    describe_sampler,
    generated_batches,
    load_captions,
    pipeline_generator,
    plan_batches,
)
from eval.reference import reference_stats
from ldm.utils.checkpoint import checkpoint_names, checkpoint_paths

log = logging.getLogger(__name__)


class Evaluator:
    """Scores sets of generated images under one protocol; every process of a group calls `evaluate` together."""

    def __init__(
        self,
        inception: InceptionScorer | None,
        clip: ClipScore | None,
        ctx: DistContext | None = None,
        dinov2: DINOv2Scorer | None = None,
    ) -> None:
        if inception is None and clip is None:
            raise ValueError("nothing to compute: give a reference (FID/KID/IS) and/or a CLIP model")
        self.inception, self.clip, self.dinov2 = inception, clip, dinov2
        self.ctx = ctx or dist_context()

    @classmethod
    def build(
        cls,
        *,
        device: torch.device | str = "cpu",
        reference: str | list[str] | None = None,
        resolution: int = 256,
        reference_num_images: int = 10000,
        reference_cache_dir: str | None = None,
        reference_batch_size: int = 64,
        inception_weights: str | None = None,
        resize: str = "torch-fidelity",
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        isc_splits: int = 10,
        rng_seed: int = 2020,
        clip_model: str | None = DEFAULT_MODEL,
        clip_pretrained: str | None = DEFAULT_PRETRAINED,
        clip_cache_dir: str | None = None,
        prc_neighborhood: int = 3,
        fd_dinov2: bool = False,
        dinov2_weights: str | None = None,
        dinov2_resize: str = "torch",
        ctx: DistContext | None = None,
    ) -> Evaluator:
        """Load the networks and the reference statistics (computing and caching them if needed: all processes)."""
        ctx = ctx or dist_context()
        inception = clip = dinov2 = None

        def stats(extractor):  # each feature space has its own cached statistics of the same images
            args = (
                resolution,
                reference_num_images,
                extractor,
                reference_cache_dir,
                reference_batch_size,
                ctx,
            )
            return reference_stats(reference, *args)

        if fd_dinov2:
            if not reference:
                raise ValueError("fd_dinov2=true needs reference images (reference=<shards>)")
            if str(reference).endswith(".npz"):
                raise ValueError(
                    f"fd_dinov2=true needs reference shards: {reference} holds Inception statistics only"
                )
            extractor = DINOv2Features(dinov2_weights, dinov2_resize).to(device)
            dinov2 = DINOv2Scorer(extractor, stats(extractor), prc_neighborhood)
        if reference:
            extractor = InceptionFeatures(inception_weights, resize).to(device)
            inception = InceptionScorer(
                extractor,
                stats(extractor),
                kid_subsets,
                kid_subset_size,
                isc_splits,
                rng_seed,
                prc_neighborhood,
            )
        if clip_model:
            clip = ClipScore(clip_model, clip_pretrained, clip_cache_dir).to(device)
        return cls(inception, clip, ctx, dinov2)

    def protocol(self) -> dict:
        return {
            "inception": self.inception.protocol() if self.inception else None,
            "clip": self.clip.identity() if self.clip else None,
            **({"dinov2": self.dinov2.protocol()} if self.dinov2 else {}),
        }

    def evaluate(
        self,
        generate: Generate,
        captions: Captions,
        num_images: int,
        seed: int = 0,
        batch_size: int = 32,
        save_dir: str | os.PathLike | None = None,
        save_first: int = 0,
        metadata: dict | None = None,
        progress: bool = False,
        collective: bool = False,
    ) -> tuple[dict, dict]:
        """(metrics, counts) of `num_images` images made by `generate`; the same on every process.

        `collective`: every process calls `generate` equally often (a sharded model's forward is a collective
        operation); a process with one batch fewer than the others generates a throwaway batch at the end."""
        ctx = self.ctx
        batches = plan_batches(num_images, captions.texts, seed, batch_size, ctx.rank, ctx.world_size)
        for scorer in (self.inception, self.clip, self.dinov2):
            if scorer is not None:
                scorer.reset()
        for batch, images in generated_batches(generate, batches, save_dir, save_first, metadata, progress):
            if self.inception is not None:
                self.inception.update(batch.indices, images)
            if self.dinov2 is not None:
                self.dinov2.update(batch.indices, images)
            if self.clip is not None:
                self.clip.update(images, batch.captions)
        num_batches = math.ceil(num_images / batch_size)
        most = math.ceil(num_batches / ctx.world_size)  # batches of the busiest process
        if collective and len(batches) < most:
            generate(batches[0].captions, batches[0].seeds)  # keeps the count of collective calls equal
        metrics, counts = {}, {"num_images": num_images}
        if self.inception is not None:
            m = self.inception.compute()
            metrics.update(
                fid=m.fid,
                kid_mean=m.kid_mean,
                kid_std=m.kid_std,
                is_mean=m.is_mean,
                is_std=m.is_std,
                precision=m.precision,
                recall=m.recall,
            )
            counts.update(
                scored_images=m.num_images,
                reference_images=m.reference_images,
                kid_subset_size=m.kid_subset_size,
                isc_splits=m.isc_splits,
            )
        if self.dinov2 is not None:
            d = self.dinov2.compute()
            metrics.update(
                fd_dinov2=d["fd_dinov2"],
                precision_dinov2=d["precision_dinov2"],
                recall_dinov2=d["recall_dinov2"],
            )
            counts["dinov2_reference_images"] = self.dinov2.reference.num_images
        if self.clip is not None:
            metrics["clip_score"] = float(self.clip.compute())
        return metrics, counts


@dataclass
class EvalSettings:
    """The keys of configs/eval.yaml (less `sampler`); see the comments there."""

    ckpt: str | list[str]  # one checkpoint, a glob pattern or a list: several are evaluated in turn
    prompts: str | list[str] | None = None
    captions_from: str | list[str] | None = None
    num_images: int = 10000
    seed: int = 0
    guidance_scale: float = 3.0
    guidance_scales: list[float] | None = None
    guidance_interval: list[float] | None = None
    guide_ckpt: str | None = None
    use_ema: bool = True
    batch_size: int = 32
    height: int | None = None
    width: int | None = None
    device: str = "auto"
    reference: str | list[str] | None = None
    reference_num_images: int = 10000
    reference_resolution: int | None = None
    reference_cache_dir: str | None = None
    reference_batch_size: int = 64
    inception_weights: str | None = None
    resize: str = "torch-fidelity"
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    isc_splits: int = 10
    rng_seed: int = 2020
    clip_model: str | None = DEFAULT_MODEL
    clip_pretrained: str | None = DEFAULT_PRETRAINED
    clip_cache_dir: str | None = None
    prc_neighborhood: int = 3
    fd_dinov2: bool = False
    dinov2_weights: str | None = None
    dinov2_resize: str = "torch"
    out_dir: str = "eval_results"
    save_images: int = 0
    progress: bool = True
    wandb: bool = False
    wandb_project: str = "ldm"
    wandb_name: str | None = None
    wandb_offline: bool | None = None


def run_evaluation(settings: EvalSettings, sampler, sampler_config: dict | None = None) -> list[dict]:
    """Evaluate `settings.ckpt` at each guidance scale; rank 0 writes `result.json` (or, for a sweep, one
    `result_cfg<scale>.json` per scale, `sweep.json` and `fid_vs_clip.png`). Several checkpoints (a list or a
    glob pattern, e.g. the post-hoc EMA widths of a run) are evaluated in turn with the same captions, seeds,
    reference statistics and scoring models, each into `out_dir/<checkpoint name>/`, and `checkpoints.json` and
    `fid_by_checkpoint.png` compare them. Returns the results (on every process; only rank 0 writes). Joins the
    process group the environment describes (torchrun, srun)."""
    owns_group = not is_distributed()
    ctx = init_distributed()
    try:
        paths = checkpoint_paths(settings.ckpt)
        if len(paths) == 1:
            return _evaluate_checkpoint(replace(settings, ckpt=paths[0]), sampler, sampler_config, ctx, {})
        return _evaluate_checkpoints(settings, paths, sampler, sampler_config, ctx)
    finally:
        if owns_group and is_distributed():
            torch.distributed.destroy_process_group()


def _evaluate_checkpoints(
    s: EvalSettings, paths: list[str], sampler, sampler_config: dict | None, ctx: DistContext
) -> list[dict]:
    from eval.report import plot_checkpoints, write_json

    names = checkpoint_names(paths)
    evaluators: dict = {}  # built once per resolution: reference statistics, Inception, CLIP
    results, points = [], []
    for path, name in zip(paths, names, strict=True):
        one = replace(
            s,
            ckpt=path,
            out_dir=str(Path(s.out_dir) / name),
            wandb_name=f"{s.wandb_name}-{name}" if s.wandb_name else None,
        )
        for result in _evaluate_checkpoint(one, sampler, sampler_config, ctx, evaluators):
            results.append(result)
            points.append(
                {
                    "checkpoint": path,
                    "name": name,
                    "guidance_scale": result["guidance_scale"],
                    "posthoc_ema": result["checkpoint"].get("posthoc_ema"),
                    **result["metrics"],
                }
            )
    if ctx.is_main:
        write_json({"points": points, "results": results}, Path(s.out_dir) / "checkpoints.json")
        plot_checkpoints(points, Path(s.out_dir) / "fid_by_checkpoint.png")
    barrier()
    return results


def _evaluate_checkpoint(
    s: EvalSettings, sampler, sampler_config: dict | None, ctx: DistContext, evaluators: dict
) -> list[dict]:
    from eval.report import plot_sweep, wandb_summary, write_json
    from ldm.inference import TextToImage

    device = resolve_device(s.device, ctx)
    pipe, bundle = TextToImage.from_checkpoint(s.ckpt, use_ema=s.use_ema, device=device)
    if s.guide_ckpt:
        pipe.load_guide(s.guide_ckpt)
    height, width = s.height or pipe.image_size[0], s.width or pipe.image_size[1]
    captions = load_captions(s.prompts, s.captions_from, s.num_images)
    resolution = s.reference_resolution or min(height, width)
    if resolution not in evaluators:
        evaluators[resolution] = _build_evaluator(s, resolution, device, ctx)
    evaluator = evaluators[resolution]
    out_dir = Path(s.out_dir)
    scales = [float(g) for g in (s.guidance_scales or [s.guidance_scale])]
    sweep = s.guidance_scales is not None
    results = []
    for g in scales:
        start = time.perf_counter()
        name = f"result_cfg{g:g}" if sweep else "result"
        metrics, counts = evaluator.evaluate(
            pipeline_generator(pipe, sampler, g, height, width, s.guidance_interval),
            captions,
            s.num_images,
            s.seed,
            s.batch_size,
            save_dir=out_dir / f"images_cfg{g:g}" if sweep else out_dir / "images",
            save_first=s.save_images,
            metadata={"guidance_scale": g, "checkpoint": str(s.ckpt)},
            progress=s.progress and ctx.is_main,
        )
        result = {
            "metrics": metrics,
            "guidance_scale": g,
            "protocol": {
                "image_size": [height, width],
                "quantization": "uint8, rounded (as a PNG of the sample)",
                **counts,
                "captions": captions.describe(),
                "assignment": "image i: caption i mod num_captions, initial noise of seed + i",
                "seed": s.seed,
                "batch_size": s.batch_size,
                "sampler": {**describe_sampler(sampler), **(sampler_config or {})},
                "guidance_scale": g,
                **({"guidance_interval": list(s.guidance_interval)} if s.guidance_interval else {}),
                "guidance": "autoguidance" if pipe.guide is not None else "classifier-free",
                **({"guide": pipe.guide_info} if pipe.guide is not None else {}),
                "use_ema": s.use_ema,
                **evaluator.protocol(),
            },
            "checkpoint": {
                "path": str(Path(s.ckpt).resolve()),
                "name": (bundle.get("config") or {}).get("name"),
                "text_encoder": (bundle.get("text_encoder") or {}).get("model_name"),
                **({"posthoc_ema": _posthoc(bundle)} if "posthoc_ema" in bundle else {}),
            },
            "run": _run_info(ctx, device, time.perf_counter() - start),
        }
        results.append(result)
        if ctx.is_main:
            path = write_json(result, out_dir / f"{name}.json")
            print(f"{name}: {json.dumps(metrics)} → {path}", flush=True)
    if ctx.is_main:
        plot = None
        if sweep:
            write_json({"points": _sweep_points(results), "results": results}, out_dir / "sweep.json")
            plot = plot_sweep(results, out_dir / "fid_vs_clip.png")
        if s.wandb:
            wandb_summary(results, out_dir, s.wandb_project, s.wandb_name, s.wandb_offline, plot, asdict(s))
    barrier()
    return results


def _build_evaluator(s: EvalSettings, resolution: int, device: torch.device, ctx: DistContext) -> Evaluator:
    return Evaluator.build(
        device=device,
        reference=s.reference,
        resolution=resolution,
        reference_num_images=s.reference_num_images,
        reference_cache_dir=s.reference_cache_dir,
        reference_batch_size=s.reference_batch_size,
        inception_weights=s.inception_weights,
        resize=s.resize,
        kid_subsets=s.kid_subsets,
        kid_subset_size=s.kid_subset_size,
        isc_splits=s.isc_splits,
        rng_seed=s.rng_seed,
        clip_model=s.clip_model,
        clip_pretrained=s.clip_pretrained,
        clip_cache_dir=s.clip_cache_dir,
        prc_neighborhood=s.prc_neighborhood,
        fd_dinov2=s.fd_dinov2,
        dinov2_weights=s.dinov2_weights,
        dinov2_resize=s.dinov2_resize,
        ctx=ctx,
    )


def _posthoc(bundle: dict) -> dict:
    """How a post-hoc EMA checkpoint was made (scripts/posthoc_ema.py), without the per-snapshot detail."""
    made = bundle["posthoc_ema"]
    return {k: made[k] for k in ("sigma_rel", "step", "residual") if k in made}


def _sweep_points(results: list[dict]) -> list[dict]:
    return [{"guidance_scale": r["guidance_scale"], **r["metrics"]} for r in results]


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _run_info(ctx: DistContext, device: torch.device, seconds: float) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()}, {torch.get_num_threads()} threads"
    packages = ("torch", "torchmetrics", "torch-fidelity", "open_clip_torch", "numpy", "scipy", "pillow")
    return {
        "world_size": ctx.world_size,
        "device": f"{device.type}: {name}",
        "seconds": round(seconds, 2),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {p: _package_version(p) for p in packages},
    }


def cli(config_name: str) -> None:
    """The body of `python eval/fid.py` (config "eval") and `eval/clip_score.py` ("eval_clip"): compose
    `configs/<config_name>.yaml` with the command line's overrides and run the evaluation it describes."""
    import hydra
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    configs = str(Path(__file__).resolve().parents[1] / "configs")  # absolute: eval/ is imported as a package

    @hydra.main(config_path=configs, config_name=config_name, version_base="1.3")
    def run(cfg: DictConfig) -> None:
        settings = OmegaConf.to_container(cfg, resolve=True)
        sampler_config = settings.pop("sampler")
        run_evaluation(EvalSettings(**settings), instantiate(cfg.sampler), sampler_config)

    run()
