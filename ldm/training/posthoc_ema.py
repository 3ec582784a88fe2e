"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3):
choose the EMA length after training instead of before it.

During training `PowerEMA` keeps two power-function averages of the UNet (by default relative widths
sigma_rel = 0.05 and 0.10) and `PostHocEMASnapshots` writes both every N steps. Afterwards, the EMA of any width
sigma_rel, at any snapshot's time, is approximated by a linear combination of the snapshots: the one whose weight
profile over the training steps is nearest, in L2, to the wanted profile (`solve_coefficients`).
`python scripts/posthoc_ema.py ckpt=... sigma_rel=[0.05,0.1,0.15]` writes one checkpoint per width
(`reconstruct`), to sample or evaluate like any other.

Time t counts EMA updates (optimizer steps, without those skipped for NaN/inf gradients). A power-function EMA
with exponent γ after t updates weighs step τ ≤ t by p(τ) = (γ + 1) τ^γ / t^(γ+1) (continuous form); its relative
standard deviation is sigma_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3))).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.training.ema import PowerEMA
from ldm.training.fsdp import full_tensor, is_sharded
from ldm.utils.checkpoint import (
    BUNDLE_KEY,
    CONTENTS_KEY,
    WEIGHTS_ONLY,
    load_bundle,
    publish,
    save_safetensors,
)

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "ldm-posthoc-ema/1"
_SNAPSHOT_NAME = re.compile(r"^step-(\d+)\.safetensors$")


# --- the profiles -------------------------------------------------------------------------------------------------
def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ of the power-function profile whose relative standard deviation is `sigma_rel`: the largest
    real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0, i.e. σ² = (γ + 1) / ((γ + 2)² (γ + 3))."""
    if not 0.0 < sigma_rel < 12**-0.5:  # γ > 0 ⟺ σ < 1/sqrt(12) (γ = 0: the uniform average, σ = 0.2887)
        raise ValueError(f"sigma_rel must be in (0, {12**-0.5:.4f}), got {sigma_rel}")
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def gamma_to_sigma_rel(gamma: float) -> float:
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def profile_inner_product(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """∫ p_a(τ) p_b(τ) dτ of two power-function profiles (ending at t_a, t_b), elementwise with broadcasting:
    (γa + 1)(γb + 1) / (γa + γb + 1) · (t_min / t_max)^γ(of the longer) / t_max."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    shorter_a = t_a <= t_b
    ratio = np.where(shorter_a, t_a / t_b, t_b / t_a)
    longer_gamma = np.where(shorter_a, gamma_b, gamma_a)
    t_max = np.maximum(t_a, t_b)
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * ratio**longer_gamma / t_max


@dataclass
class Fit:
    coefficients: np.ndarray  # one per snapshot profile
    residual: float  # ‖p_target − Σ c_i p_i‖ / ‖p_target‖: 0 = the target profile exactly


def solve_coefficients(
    times: Sequence[float], gammas: Sequence[float], target_time: float, target_gamma: float
) -> Fit:
    """The combination of the snapshot profiles (t_i, γ_i) nearest in L2 to the profile (target_time,
    target_gamma): the normal equations A c = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target> (least squares,
    since nearby snapshots make A ill-conditioned). Coefficients are rescaled to sum to 1, so that a constant
    weight is kept exactly."""
    t, g = np.asarray(times, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    if t.shape != g.shape or t.ndim != 1 or not len(t):
        raise ValueError("times and gammas: one per snapshot profile")
    A = profile_inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner_product(t, g, target_time, target_gamma)
    c = np.linalg.lstsq(A, b, rcond=None)[0]
    c = c / c.sum()
    target = float(profile_inner_product(target_time, target_gamma, target_time, target_gamma))
    squared = target - 2 * c @ b + c @ A @ c
    return Fit(c, float(np.sqrt(max(squared, 0.0) / target)))


# --- snapshots ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int  # the trainer's global step when written
    t: int  # EMA updates so far (the profiles' time)
    gammas: tuple[float, ...]


def save_snapshot(
    power_ema: PowerEMA, path: str | os.PathLike | None, step: int, dtype=torch.float16
) -> Path | None:
    """Every average of `power_ema` in one safetensors file (`<k>.<parameter>` for exponent k, floats in `dtype`),
    written to a temporary file and renamed; the metadata holds the step, t and the exponents. Sharded (FSDP)
    averages are gathered tensor by tensor, a collective: every rank calls this, and those with `path` None only
    take part in the gathers."""
    tensors = {}
    for k, average in enumerate(power_ema.averages):
        for name, value in average.state_dict().items():
            value = full_tensor(value.detach())
            if path is not None:
                value = value.to(dtype) if value.is_floating_point() else value
                tensors[f"{k}.{name}"] = value.cpu().contiguous()
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": SNAPSHOT_FORMAT,
        "step": str(int(step)),
        "t": str(power_ema.updates),
        "gammas": json.dumps(power_ema.gammas),
        "sigma_rels": json.dumps([gamma_to_sigma_rel(g) for g in power_ema.gammas]),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    try:  # as atomic_save: no temporary file left by a failure
        save_safetensors(tensors, tmp, metadata=metadata)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def snapshot_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"step-{int(step):08d}.safetensors"


def find_snapshots(folders: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Snapshot]:
    """The snapshots in `folders` (one or several: a run resumed elsewhere), read from their metadata only,
    sorted by step; a step found twice (rewritten after a resume) counts once, the later folder's."""
    folders = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
    found: dict[int, Snapshot] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no post-hoc EMA snapshot folder at {folder}")
        for path in sorted(folder.iterdir()):
            if not _SNAPSHOT_NAME.match(path.name):
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
            except Exception as exn:
                raise ValueError(
                    f"{path} is not a readable snapshot ({exn}); move it out of the folder"
                ) from exn
            if meta.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"{path} is not a post-hoc EMA snapshot (format {meta.get('format')!r})")
            snap = Snapshot(path, int(meta["step"]), int(meta["t"]), tuple(json.loads(meta["gammas"])))
            found[snap.step] = snap
    if not found:
        raise FileNotFoundError(
            f"no post-hoc EMA snapshots (step-*.safetensors) in {', '.join(map(str, folders))}: train with "
            "stage.posthoc_ema set (configs/stage/diffusion.yaml)"
        )
    return [found[s] for s in sorted(found)]


def reconstruct(
    snapshots: Sequence[Snapshot], sigma_rel: float, step: int | None = None
) -> tuple[dict[str, torch.Tensor], Fit, Snapshot]:
    """The UNet state dict of the EMA of width `sigma_rel` at the time of the snapshot of `step` (default: the
    latest), combined from the snapshots up to it (float32 sums); with the fit and the snapshot it ends at."""
    [(state, fit)], end = reconstruct_widths(snapshots, [sigma_rel], step)
    return state, fit, end


def reconstruct_widths(
    snapshots: Sequence[Snapshot], widths: Sequence[float], step: int | None = None
) -> tuple[list[tuple[dict[str, torch.Tensor], Fit]], Snapshot]:
    """`reconstruct` for several widths at once, reading each snapshot file once: [(state dict, fit)] in the
    order of `widths`, and the snapshot they end at."""
    chosen = [s for s in snapshots if step is None or s.step <= step]
    if not chosen or (step is not None and chosen[-1].step != step):
        have = ", ".join(str(s.step) for s in snapshots)
        raise ValueError(f"no snapshot at step {step}; snapshots exist at steps {have}")
    end = chosen[-1]
    times = [
        s.t for s in chosen for _ in s.gammas
    ]  # profiles in file order: snapshot by snapshot, exponent k
    gammas = [g for s in chosen for g in s.gammas]
    fits = [solve_coefficients(times, gammas, end.t, sigma_rel_to_gamma(w)) for w in widths]
    states: list[dict[str, torch.Tensor]] = [{} for _ in widths]
    first = 0  # index of the snapshot's first profile
    for snap in chosen:
        for key, value in load_file(str(snap.path)).items():
            index, _, name = key.partition(".")
            for fit, state in zip(fits, states, strict=True):
                if not value.is_floating_point():  # integer buffers: the latest snapshot's
                    state[name] = value
                    continue
                term = value.float() * float(fit.coefficients[first + int(index)])
                state[name] = state[name].add_(term) if name in state else term
        first += len(snap.gammas)
    return list(zip(states, fits, strict=True)), end


# --- during training ----------------------------------------------------------------------------------------------
class PostHocEMASnapshots(L.Callback):
    """Writes the module's `posthoc_ema` (a `PowerEMA`; nothing when it has none) to
    `dirpath/step-<step>.safetensors` every `every_n_steps` optimizer steps and at the end of training, on rank 0
    (under FSDP every rank takes part in gathering the shards).
    `dtype`: the snapshots' float type (float16 halves the bytes of float32; the reconstruction sums in float32).
    """

    def __init__(self, dirpath: str, every_n_steps: int = 5000, dtype: str = "float16") -> None:
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        self.dirpath, self.every_n_steps = Path(dirpath), every_n_steps
        self.dtype = getattr(torch, dtype)
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a torch float type name, got {dtype!r}")
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._last_step and step > 0 and step % self.every_n_steps == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step and trainer.global_step > 0:
            self._save(trainer, pl_module)

    def _save(self, trainer, pl_module) -> None:
        self._last_step = step = trainer.global_step
        power_ema = getattr(pl_module, "posthoc_ema", None)
        if power_ema is None or not (trainer.is_global_zero or is_sharded(trainer.strategy)):
            return
        path = snapshot_path(self.dirpath, step) if trainer.is_global_zero else None
        if save_snapshot(power_ema, path, step, self.dtype) is not None:
            log.info("post-hoc EMA snapshot %s (t = %d)", path, power_ema.updates)


# --- after training -----------------------------------------------------------------------------------------------
def default_snapshot_folder(ckpt: str | os.PathLike) -> Path:
    """Where a run's snapshots are, given one of its checkpoints: `checkpoints/posthoc_ema` beside
    `checkpoints/last.ckpt` (or above `checkpoints/weights/step_*.ckpt`)."""
    ckpt = Path(ckpt)
    for folder in (ckpt.parent / "posthoc_ema", ckpt.parent.parent / "posthoc_ema"):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"no posthoc_ema/ folder beside {ckpt} or above it: pass snapshots=<folder> (the run's "
        "checkpoints/posthoc_ema), or train with stage.posthoc_ema set"
    )


def posthoc_checkpoint(
    ckpt: str | os.PathLike, snapshots: Sequence[Snapshot], sigma_rel: float, step: int | None = None
) -> tuple[dict, Fit, Snapshot]:
    """A weights-only stage-2 checkpoint (what `sample.py`, `eval/` and `init_from` read) whose EMA UNet is the
    post-hoc EMA of width `sigma_rel` at `step` (default: the latest snapshot); the autoencoder, latent scale,
    text encoder and self-description come from `ckpt`, a checkpoint of the same run. The bundle records how it
    was made under "posthoc_ema"."""
    return next(posthoc_checkpoints(ckpt, snapshots, [sigma_rel], [step]))


def posthoc_checkpoints(
    ckpt: str | os.PathLike,
    snapshots: Sequence[Snapshot],
    widths: Sequence[float],
    steps: Sequence[int | None] = (None,),
) -> Iterator[tuple[dict, Fit, Snapshot]]:
    """`posthoc_checkpoint` for every width at every step, step by step: `ckpt` is read once, and each snapshot
    once per step for all the widths."""
    bundle, full = load_bundle(ckpt)
    if bundle.get("stage") != "diffusion":
        raise ValueError(f"{ckpt} is a '{bundle.get('stage')}' checkpoint; post-hoc EMA needs a stage-2 one")
    state = full["state_dict"]
    theirs = {k[len("ema.module.") :]: v.shape for k, v in state.items() if k.startswith("ema.module.")}
    kept = {k: v for k, v in state.items() if k.startswith(("codec.", "text_encoder."))}
    for step in steps:
        results, end = reconstruct_widths(snapshots, widths, step)
        for sigma_rel, (unet, fit) in zip(widths, results, strict=True):
            if set(unet) != set(theirs):
                raise ValueError(
                    f"the snapshots hold another UNet than {ckpt} ({len(set(unet) ^ set(theirs))} parameter "
                    "names differ): pass a checkpoint of the run that wrote them"
                )
            if any(tuple(unet[k].shape) != tuple(theirs[k]) for k in unet):
                raise ValueError(f"the snapshots hold a UNet of other shapes than {ckpt}'s")
            out_state = {**kept, **{f"ema.module.{k}": v for k, v in unet.items()}}
            out_state["ema.num_updates"] = torch.tensor(end.t)
            made = {
                "sigma_rel": float(sigma_rel),
                "gamma": sigma_rel_to_gamma(sigma_rel),
                "step": end.step,
                "t": end.t,
                "residual": fit.residual,
                "snapshots": [
                    {"step": s.step, "gammas": list(s.gammas)} for s in snapshots if s.step <= end.step
                ],
                "coefficients": [float(c) for c in fit.coefficients],
            }
            out_bundle = {**bundle, CONTENTS_KEY: WEIGHTS_ONLY, "posthoc_ema": made}
            yield {BUNDLE_KEY: out_bundle, "state_dict": out_state, "global_step": end.step}, fit, end
