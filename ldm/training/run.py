"""`train(cfg)`: compose the parts a config names, then fit. The body of `python train.py ...`."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.data.latents import encoder_digest, read_cache_info
from ldm.inference import LatentCodec
from ldm.training.checkpoint_io import AtomicCheckpointIO
from ldm.training.fast_paths import FastPathsCallback
from ldm.training.fsdp import compile_blocks, is_sharded
from ldm.training.init_from import load_init_weights
from ldm.training.nonfinite import NonFiniteGradients, configured_limit, limit_under_scaler
from ldm.training.optim import ConfiguredOptimizer
from ldm.training.parallel import allow_idle_discriminator, cluster_settings, scale_lr, sharding_strategy
from ldm.training.resume import ExactResumeCallback, PreemptionCallback
from ldm.training.throughput import ThroughputCallback
from ldm.utils.checkpoint import BUNDLE_KEY, CONTENTS_KEY, WEIGHTS_ONLY, load_bundle, submodule_state
from ldm.utils.hydra_build import (
    build_autoencoder,
    build_denoising_parts,
    check_config,
    import_target,
    to_plain,
)
from ldm.utils.speed import set_tf32

log = logging.getLogger(__name__)
# the frozen text encoder, autoencoder and EMA copy are in eval mode on purpose
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict:
    """Train one stage as `cfg` describes; returns the final checkpoint path and the last logged metrics.

    `extra_callbacks` join those of the config (benchmarks and tests use it to observe a run). A run dir that
    holds an `hpc_ckpt_<n>.ckpt` (left by a preempted run) resumes from it. On the preemption signal (USR1) the
    run checkpoints, stops, and under Slurm requeues its job; the result then has `preempted: True`."""
    preemption = (
        PreemptionCallback()
    )  # first: from here on USR1 (submitit: USR2) checkpoints instead of killing
    check_config(cfg)
    stage = stage_of(cfg)
    L.seed_everything(cfg.seed, workers=True)
    set_tf32(cfg.get("tf32", True))  # TF32 matmuls and convolutions on Ampere+; no effect on CPU
    run_dir = Path(cfg.run_dir)

    ckpt_path = _resume_checkpoint(cfg)
    init = _init_checkpoint(cfg, resuming=ckpt_path is not None)
    stage1 = None
    if stage == "diffusion":
        stage1 = _adopt_autoencoder_config(cfg)
    else:
        _cache_info(cfg)  # refuses cached latents as stage-1 data
    trainer_overrides, plugins = cluster_settings(cfg)
    trainer_overrides.update(sharding_strategy(cfg, stage))
    module = build_module(cfg, stage1)
    if init is not None:
        load_init_weights(module, init, cfg.init_from)
    _check_bucket_sizes(cfg, module)
    _compile(cfg, module, trainer_overrides.get("strategy"))
    datamodule = instantiate(cfg.data)
    logger = [instantiate(cfg.logger, **_wandb_run(cfg, run_dir))] if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += [ExactResumeCallback(), ConfiguredOptimizer(module.optim_settings), *_speed_callbacks(cfg)]
    callbacks += [preemption, *extra_callbacks]
    max_nonfinite_steps = configured_limit(cfg.get("max_nonfinite_steps", 10))
    if not module.automatic_optimization:  # the module clips each of its optimizers itself
        module.gradient_clip_val = cfg.trainer.get("gradient_clip_val")
        trainer_overrides["gradient_clip_val"] = None
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        **trainer_overrides,
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *plugins],
    )
    allow_idle_discriminator(module, trainer)
    module.max_nonfinite_steps = limit_under_scaler(
        max_nonfinite_steps, getattr(trainer.precision_plugin, "scaler", None)
    )
    scale = scale_lr(cfg, module, trainer)
    if logger and trainer.is_global_zero:
        logger[0].log_hyperparams({**to_plain(cfg), "derived": scale})
    _check_resumable(ckpt_path)
    log.info("stage %s: run dir %s; %s", stage, run_dir, scale)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        final = run_dir / "checkpoints" / "last.ckpt"
        if preemption.preempted:
            final = Path(preemption.checkpoint)
        else:  # the state at max_steps (whatever the periodic interval), or where NaN/inf gradients stopped it
            trainer.save_checkpoint(final)
        if module.nonfinite_stop:
            message = f"stopped at step {trainer.global_step}: {module.nonfinite_stop} Checkpoint: {final}"
            log.error(message)
            _alert(trainer, "ldm: run stopped on NaN/inf gradients", message)
            raise NonFiniteGradients(message)
    finally:
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger) and lg._experiment is not None:
                lg.experiment.finish()  # a later train() in this process starts its own run
    if preemption.preempted and trainer.is_global_zero:
        _requeue(preemption)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return {
        "checkpoint": str(final),
        "run_dir": str(run_dir),
        "metrics": metrics,
        "global_step": trainer.global_step,
        "preempted": preemption.preempted,
    }


def _alert(trainer: L.Trainer, title: str, text: str) -> None:
    """A W&B alert (e-mail / Slack, as the user's W&B settings say) from rank 0; offline runs record nothing."""
    if not trainer.is_global_zero:
        return
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            try:
                lg.experiment.alert(title=title, text=text[:1000], level="ERROR")
            except Exception as err:  # an alert must never hide the error it reports
                log.warning("W&B alert not sent: %s", err)


def _speed_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Throughput panels (perf/*, MFU against `peak_tflops` or the device's known peak) and the switchable fast
    paths `channels_last` and `sdpa_backend` (docs/benchmarks.md measures them)."""
    return [
        ThroughputCallback(peak_tflops=cfg.get("peak_tflops")),
        FastPathsCallback(
            channels_last=bool(cfg.get("channels_last", False)), sdpa=cfg.get("sdpa_backend", "auto")
        ),
    ]


def _compile(cfg: DictConfig, module: L.LightningModule, strategy=None) -> None:
    """`compile=true`: torch.compile the trained network (under `strategy=fsdp` each of its blocks) and, in stage 2
    on raw images, the frozen autoencoder's encoder, which then runs every step. In place: state_dict keys stay
    those of the plain modules."""
    if not cfg.get("compile"):
        return
    network = module.trainable_module()
    if is_sharded(strategy):
        # FSDP: block by block, so that each block's gather/free hooks stay outside the compiled graphs
        compile_blocks(network.blocks(), num_sizes=len(_training_sizes(cfg) or [None]))
    else:
        network.compile()
    if stage_of(cfg) == "diffusion" and _cache_info(cfg) is None:
        module.codec.autoencoder.encoder.compile()


def _init_checkpoint(cfg: DictConfig, resuming: bool = False) -> dict | None:
    """`init_from=<checkpoint>` (progressive resolution: a 256-px run continued at 512): the checkpoint whose
    weights the run starts from, unlike `ckpt_path` without its optimizer, step counter or data position. Its
    stage must be this run's; a stage-2 run without `autoencoder_ckpt` takes the one the checkpoint used. None
    when the run resumes (`ckpt_path`, or a checkpoint in its run dir): the resumed state has the weights."""
    if not cfg.get("init_from"):
        return None
    bundle, ckpt = load_bundle(cfg.init_from)
    if bundle.get("stage") != stage_of(cfg):
        raise ValueError(
            f"init_from={cfg.init_from} is a '{bundle.get('stage')}' checkpoint; this run is '{stage_of(cfg)}'"
        )
    if bundle["stage"] == "diffusion" and not cfg.get("autoencoder_ckpt"):
        with open_dict(cfg):
            cfg.autoencoder_ckpt = bundle["config"].get("autoencoder_ckpt")
    return None if resuming else ckpt


def _check_resumable(path: str | None) -> None:
    """`ckpt_path` must be a full checkpoint: a weights-only one (checkpoints/weights/) has no optimizer, loop or
    data state to resume, and no raw weights. Read memory-mapped: only the small bundle is touched."""
    if not path or not Path(path).is_file():
        return  # none, a distributed checkpoint folder, or a remote path: Lightning reports what is wrong
    bundle = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(BUNDLE_KEY) or {}
    if bundle.get(CONTENTS_KEY) == WEIGHTS_ONLY:
        raise ValueError(
            f"ckpt_path={path} is a weights-only checkpoint (EMA weights for sampling and evaluation, no optimizer "
            "or data state): resume from a full one (checkpoints/last.ckpt or checkpoints/step_*.ckpt), or start "
            "a new run from these weights with init_from=" + str(path)
        )


def _training_sizes(cfg: DictConfig) -> list[tuple[int, int]] | None:
    """The image sizes (h, w) of the training batches with aspect-ratio buckets (`data.buckets`, or those a latent
    cache was written with); None for square images of `data.resolution`."""
    from ldm.data.buckets import BucketSpec
    from ldm.latent_cache import cached_bucket_sizes

    cached = cached_bucket_sizes(_cache_info(cfg))
    if cached is not None or not cfg.data.get("buckets"):
        return cached
    return BucketSpec.of(cfg.data.buckets).sizes(cfg.data.resolution)


def _check_bucket_sizes(cfg: DictConfig, module: L.LightningModule) -> None:
    """Aspect-ratio buckets must be latent sizes the networks take: multiples of the total downsampling."""
    sizes = _training_sizes(cfg)
    if sizes is None:
        return
    if stage_of(cfg) == "diffusion":
        factor = module.codec.autoencoder.downsample_factor * module.unet.downsample_factor
    else:
        factor = module.autoencoder.downsample_factor
    cached = _cache_info(cfg) is not None
    bad = [hw for hw in sizes if hw[0] % factor or hw[1] % factor]
    if bad and cached:
        raise ValueError(
            f"the cached latents in {cfg.data.train_urls} hold bucket sizes {bad}, not multiples of {factor} (the "
            f"autoencoder's and UNet's total downsampling); cache again with buckets.step a multiple of {factor}"
        )
    if bad:
        raise ValueError(
            f"data.buckets: sizes {bad} are not multiples of {factor} (the autoencoder's and UNet's total "
            f"downsampling); set data.buckets.step to a multiple of {factor}"
        )


def _resume_checkpoint(cfg: DictConfig) -> str | None:
    """What the run resumes from: `ckpt_path`, else the newest full checkpoint in its run dir, else None."""
    if cfg.get("ckpt_path"):
        return cfg.ckpt_path
    found = _newest_checkpoint(Path(cfg.run_dir))
    if found is None:
        return None
    path, step = found
    max_steps = cfg.trainer.get("max_steps") or -1
    if 0 < max_steps <= step:
        log.warning(
            "the run in %s already reached trainer.max_steps=%d (step %d): nothing is left to train. Raise "
            "trainer.max_steps to go on, or start anew in another run dir (hydra.run.dir=...)",
            cfg.run_dir,
            max_steps,
            step,
        )
    return str(path)


def _newest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """(path, step) of the full checkpoint of the latest training step in `run_dir`: among the `hpc_ckpt_<n>.ckpt`
    a preempted run left and the periodic ones in `checkpoints/`, which are all a run killed without warning (node
    failure, out-of-memory kill, `scancel`) leaves. A requeued job, or the same command rerun in the same run dir,
    resumes from it. Weights-only checkpoints and unreadable files are passed over; only the step counter is read
    (memory-mapped)."""
    newest = None
    for path in [*run_dir.glob("hpc_ckpt_*.ckpt"), *(run_dir / "checkpoints").glob("*.ckpt")]:
        if not path.is_file():
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - a damaged file must not keep the run from the others
            log.warning("not resuming from %s: it cannot be read (%s)", path, err)
            continue
        if (ckpt.get(BUNDLE_KEY) or {}).get(CONTENTS_KEY) == WEIGHTS_ONLY or "global_step" not in ckpt:
            continue
        # of one step, the preemption's own (ModelCheckpoint writes last.ckpt as the preempted run stops), then the later
        key = (int(ckpt["global_step"]), path.name.startswith("hpc_ckpt_"), path.stat().st_mtime)
        if newest is None or key > newest[0]:
            newest = key, path
    if newest is None:
        return None
    (step, *_), path = newest
    log.info("resuming from %s (step %d: the newest checkpoint in the run dir)", path, step)
    return path, step


def _requeue(preemption: PreemptionCallback) -> None:
    submitit = preemption.handed_over()
    if submitit is not None:
        # a job of Hydra's submitit launcher: its handler resubmits the same sweep job (same run dir, counted
        # against max_num_timeout), runs `scontrol requeue` and exits
        log.warning("preempted: the requeue is left to %s", getattr(submitit, "__qualname__", submitit))
        submitit(preemption.received, None)
        return
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return  # not under Slurm: rerun the same command (same run dir) to resume
    # said before, not after: a successful requeue ends this job's processes at once, often before scontrol returns
    log.warning("requeueing Slurm job %s (scontrol requeue)", job)
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())


def _wandb_run(cfg: DictConfig, run_dir: Path) -> dict:
    """One W&B run per run dir: its id is kept in `run_dir/wandb_id.txt`, so a requeued or resumed job logs
    into the same run. Derived from the Slurm job id under Slurm (the same on every rank), else random.
    In a Hydra sweep (`-m`) each point is named `<name>-<point number>` and the points are grouped by sweep,
    unless logger.name / logger.group say otherwise."""
    if not str(cfg.logger.get("_target_", "")).endswith("wandb_logger"):
        return {}
    settings = _sweep_names(cfg)
    if cfg.logger.get("id"):
        return settings
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        run_id = path.read_text().strip()
    else:
        job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        run_id = f"{cfg.name}-slurm{job}" + (f"_{task}" if task else "") if job else None
        run_id = run_id or secrets.token_hex(4)
        if int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", 0))) == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(run_id + "\n")
    return {**settings, "id": run_id, "resume": "allow"}


def _sweep_names(cfg: DictConfig) -> dict:
    """W&B name and group of a Hydra sweep point: `<name>-<job num>` in group `<name>-<sweep dir name>`."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra = HydraConfig.get()
    out = {}
    if cfg.logger.get("name") in (None, cfg.name):
        out["name"] = f"{cfg.name}-{hydra.job.num}"
    if cfg.logger.get("group") is None:
        out["group"] = f"{cfg.name}-{Path(hydra.sweep.dir).name}"
    return out


def build_module(cfg: DictConfig, stage1: tuple[dict, dict] | None = None) -> L.LightningModule:
    """The stage's LightningModule. Stage 2 loads the autoencoder weights from `cfg.autoencoder_ckpt`, or takes
    them from `stage1` (what `_adopt_autoencoder_config` returned: the file is read once)."""
    make_module = instantiate(cfg.stage)  # a partial of the stage's LightningModule
    optim = instantiate(cfg.optim)
    plain = to_plain(cfg)
    if stage_of(cfg) == "autoencoder":
        return make_module(autoencoder=build_autoencoder(cfg), optim=optim, config=plain)
    parts = build_denoising_parts(cfg)
    _check_cached_text_encoder(cfg, parts["text_encoder"])
    codec = LatentCodec(build_autoencoder(cfg), scale=cfg.get("latent_scale"))
    if cfg.autoencoder_ckpt:
        bundle, weights = stage1 or _stage1_weights(cfg.autoencoder_ckpt)
        codec.autoencoder.load_state_dict(weights)
        if cfg.get("latent_scale") is None and bundle.get("latent_scale") is not None:
            codec.scale.fill_(bundle["latent_scale"])
            codec.shift.fill_(bundle.get("latent_shift", 0.0))
    return make_module(
        unet=parts["unet"],
        diffusion=parts["diffusion"],
        text_encoder=parts["text_encoder"],
        codec=codec,
        optim=optim,
        config=plain,
    )


def stage_of(cfg: DictConfig) -> str:
    """ "autoencoder" or "diffusion": the `stage` attribute of the LightningModule the `stage` group names."""
    return import_target(cfg.stage._target_).stage


def _stage1_weights(path: str) -> tuple[dict, dict]:
    """(self-description, autoencoder state dict) of a stage-1 checkpoint."""
    bundle, ckpt = load_bundle(path)
    return bundle, submodule_state(ckpt["state_dict"], "autoencoder")


def _adopt_autoencoder_config(cfg: DictConfig) -> tuple[dict, dict]:
    """Stage 2 encodes with a trained stage-1 autoencoder: its architecture comes from that checkpoint. With cached
    latents, the checkpoint and resolution default to the cache's, and must match it. Returns what
    `_stage1_weights` read, for `build_module`."""
    cache = _cache_info(cfg)
    with open_dict(cfg):
        if cache is not None:
            cfg.autoencoder_ckpt = cfg.autoencoder_ckpt or cache.get("autoencoder_checkpoint")
            cfg.data.resolution = cfg.data.get("resolution") or cache.get("resolution")
    if not cfg.autoencoder_ckpt:
        raise ValueError(
            "stage 2 (diffusion) needs a trained autoencoder: set autoencoder_ckpt=path/to/stage1/last.ckpt "
            "(train one with `python train.py experiment=vae_tiny` or `experiment=vae_laion_256`)"
        )
    bundle, weights = _stage1_weights(cfg.autoencoder_ckpt)
    if bundle.get("stage") != "autoencoder":
        raise ValueError(
            f"autoencoder_ckpt={cfg.autoencoder_ckpt} is a '{bundle.get('stage')}' checkpoint, not stage 1"
        )
    encoder = None
    for urls, info in _caches(cfg):  # the held-out cache too: its val/loss would mean nothing otherwise
        if info.get("autoencoder") not in (None, bundle["config"]["autoencoder"]):
            raise ValueError(
                f"the cached latents in {urls} were made by another autoencoder than "
                f"autoencoder_ckpt={cfg.autoencoder_ckpt} (architectures differ)"
            )
        if info.get("encoder_sha256") is not None:  # caches written before it was recorded are not checked
            encoder = encoder or encoder_digest(weights)
            if info["encoder_sha256"] != encoder:
                raise ValueError(
                    f"the cached latents in {urls} were encoded by other encoder weights than those of "
                    f"autoencoder_ckpt={cfg.autoencoder_ckpt} (the cache was made from "
                    f"{info.get('autoencoder_checkpoint')}): its decoder and latent scale would not match them. "
                    "Train with that checkpoint, or cache the images again with this one"
                )
        if info.get("resolution") not in (None, cfg.data.resolution):
            # e.g. experiment=laion_512 (data.resolution: 512) on latents cached at 256 px
            raise ValueError(
                f"data.resolution={cfg.data.resolution}, but the latents in {urls} were cached at "
                f"{info['resolution']} px: cache the images at {cfg.data.resolution} px (scripts/cache_latents.py "
                f"resolution={cfg.data.resolution}) or set data.resolution={info['resolution']}"
            )
    if cfg.data.get("hflip_prob") and cache is not None and not cache.get("flips"):
        raise ValueError(
            f"data.hflip_prob={cfg.data.hflip_prob}, but the latents in {cfg.data.train_urls} were cached without "
            "their mirror images (a latent cannot be flipped after the fact): cache again with flips=true "
            "(scripts/cache_latents.py) or set data.hflip_prob=0"
        )
    with open_dict(cfg):
        cfg.autoencoder = OmegaConf.create(bundle["config"]["autoencoder"])
    if cfg.data.get("resolution") is None:
        raise ValueError(
            "data.resolution is not set and the cached shards have no cache_info.json to take it from"
        )
    return bundle, weights


def _cache_info(cfg: DictConfig) -> dict | None:
    """The cache_info.json of cached-latent training data; None for image data (or remote caches)."""
    if getattr(import_target(cfg.data._target_), "provides", "images") != "latents":
        return None
    if stage_of(cfg) != "diffusion":
        raise ValueError("cached latents (data=latents) are for stage 2; stage 1 trains on images")
    return read_cache_info(cfg.data.train_urls)


def _caches(cfg: DictConfig) -> list[tuple[str, dict]]:
    """(urls, cache_info) of the cached-latent training and held-out data that have a cache_info.json."""
    found = [(cfg.data.train_urls, _cache_info(cfg))]
    if found[0][1] is not None and cfg.data.get("val_urls"):
        found.append((cfg.data.val_urls, read_cache_info(cfg.data.val_urls)))
    return [(urls, info) for urls, info in found if info is not None]


def _check_cached_text_encoder(cfg: DictConfig, text_encoder) -> None:
    for urls, cache in _caches(cfg):
        cached = cache.get("text_encoder")
        if cached is not None and cfg.data.get("captions"):
            raise ValueError(
                f"data.captions draws each caption from several sources, but {urls} holds the text encoding of "
                "one caption per image; cache again without text_encoder= (the text encoder then runs in training)"
            )
        if cached is not None and cached != text_encoder.identity():
            raise ValueError(
                f"the text encodings cached in {urls} were made by text encoder {cached}, but this run's text "
                f"encoder is {text_encoder.identity()}; set text_encoder= to match, or cache again"
            )
