"""Where results go: JSON files next to each other, the FID-vs-CLIP plot of a sweep, a W&B run's summary."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ldm.utils.wandb_mode import wandb_offline


def write_json(obj: dict, path: str | os.PathLike) -> Path:
    """Pretty JSON, written to a temporary file then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


_LABELS = {"fid": "FID", "fd_dinov2": "FD_DINOv2", "clip_score": "CLIP score"}


def _distances(metrics: list[dict]) -> list[str]:
    """The distances every result has: FID, and FD_DINOv2 when it was computed."""
    return [m for m in ("fid", "fd_dinov2") if all(r.get(m) is not None for r in metrics)]


def plot_sweep(results: list[dict], path: str | os.PathLike) -> Path:
    """FID (and FD_DINOv2, in a panel of its own) against CLIP score, one point per guidance scale (the trade-off
    curve of Saharia et al. 2022, fig. A.11); against the scale when there is no CLIP score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r["guidance_scale"] for r in results]
    clip = [r["metrics"].get("clip_score") for r in results]
    x, xlabel = (clip, "CLIP score") if all(c is not None for c in clip) else (scales, "guidance scale")
    distances = _distances([r["metrics"] for r in results]) or ["fid"]
    fig, axes = plt.subplots(1, len(distances), figsize=(5 * len(distances), 4), dpi=120, squeeze=False)
    protocol = results[0]["protocol"]
    for ax, metric in zip(axes[0], distances, strict=True):
        y = [r["metrics"].get(metric, math.nan) for r in results]
        ax.plot(x, y, "o-")
        for xi, yi, g in zip(x, y, scales, strict=True):
            ax.annotate(f"w={g:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(
            xlabel=xlabel, ylabel=_LABELS[metric], title=f"guidance sweep, {protocol['num_images']} images"
        )
        ax.grid(alpha=0.3)
        ax.ticklabel_format(useOffset=False)
    return _save_figure(fig, path)


def plot_checkpoints(points: list[dict], path: str | os.PathLike) -> Path:
    """FID and FD_DINOv2 (CLIP score without a reference) per checkpoint, one line per guidance scale: against the
    EMA width when every checkpoint is a post-hoc EMA (scripts/posthoc_ema.py), else in the order given, named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _distances(points) or ["clip_score"]
    widths = [(p.get("posthoc_ema") or {}).get("sigma_rel") for p in points]
    by_width = all(w is not None for w in widths)
    names = list(dict.fromkeys(p["name"] for p in points))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), dpi=120, squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for scale in dict.fromkeys(p["guidance_scale"] for p in points):
            mine = [(w, p) for w, p in zip(widths, points, strict=True) if p["guidance_scale"] == scale]
            x = [w if by_width else names.index(p["name"]) for w, p in mine]
            ax.plot(x, [p[metric] for _, p in mine], "o-", label=f"w={scale:g}")
        if by_width:
            ax.set_xlabel("post-hoc EMA width sigma_rel")
        else:
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel=_LABELS[metric], title=f"{len(names)} checkpoints")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save_figure(fig, path)


def _save_figure(fig, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _flat(prefix: str, obj, out: dict) -> dict:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat(f"{prefix}/{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj if isinstance(obj, int | float | str | bool) or obj is None else json.dumps(obj)
    return out


def wandb_summary(
    results: list[dict],
    out_dir: str | os.PathLike,
    project: str = "ldm",
    name: str | None = None,
    offline: bool | None = None,
    plot: str | os.PathLike | None = None,
    config: dict | None = None,
) -> Path:
    """One W&B run (job_type "eval") whose summary holds the metrics and the protocol; a sweep also logs one
    step per guidance scale, a table and the plot. Offline (under `out_dir/wandb`) when no API key is configured.
    Returns the run's directory."""
    import wandb

    if offline is None:
        offline = wandb_offline()
    ckpt = results[0]["checkpoint"]
    run = wandb.init(
        project=project,
        name=name or f"eval-{ckpt.get('name') or Path(ckpt['path']).stem}",
        dir=str(out_dir),
        mode="offline" if offline else "online",
        job_type="eval",
        config=config,
    )
    try:
        if len(results) == 1:
            run.summary.update(_flat("eval", results[0]["metrics"], {}))
        else:
            columns = ["guidance_scale", *results[0]["metrics"]]
            table = wandb.Table(columns=columns)
            for step, r in enumerate(results):
                run.log(
                    {"eval/guidance_scale": r["guidance_scale"], **_flat("eval", r["metrics"], {})}, step=step
                )
                table.add_data(r["guidance_scale"], *r["metrics"].values())
                run.summary.update(_flat(f"eval/cfg{r['guidance_scale']:g}", r["metrics"], {}))
            run.log({"eval/sweep": table}, step=len(results) - 1)
            if plot is not None:
                run.log({"eval/fid_vs_clip": wandb.Image(str(plot))}, step=len(results) - 1)
        protocol = {k: v for k, v in results[0]["protocol"].items() if k != "guidance_scale"}
        run.summary.update(_flat("protocol", protocol, {}))
        run.summary.update(_flat("checkpoint", ckpt, {}))
        return Path(run.dir).parent
    finally:
        run.finish()
