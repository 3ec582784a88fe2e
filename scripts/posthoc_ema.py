"""Post-hoc EMA: the EMA of any relative width, combined from a run's snapshots (configs/posthoc_ema.yaml).

python scripts/posthoc_ema.py ckpt=runs/laion_256/<date>/checkpoints/last.ckpt sigma_rel='[0.05,0.1,0.15]'
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig

import ldm.utils.hydra_build  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="posthoc_ema", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ldm.training.posthoc_ema import (
        default_snapshot_folder,
        find_snapshots,
        posthoc_checkpoints,
        sigma_rel_to_gamma,
    )
    from ldm.utils.checkpoint import BUNDLE_KEY, atomic_save

    if not Path(cfg.ckpt).is_file():
        raise FileNotFoundError(f"ckpt={cfg.ckpt}: no such checkpoint file")
    folders = cfg.snapshots or default_snapshot_folder(cfg.ckpt)
    folders = list(folders) if isinstance(folders, ListConfig) else [folders]
    snapshots = find_snapshots(folders)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(folders[-1]).parent / "posthoc"
    widths = [float(w) for w in (cfg.sigma_rel if isinstance(cfg.sigma_rel, ListConfig) else [cfg.sigma_rel])]
    steps = list(cfg.step) if isinstance(cfg.step, ListConfig) else [cfg.step]
    # every width and step checked before the checkpoint is read and anything is written
    for width in widths:
        sigma_rel_to_gamma(width)
    missing = [s for s in steps if s is not None and s not in {snap.step for snap in snapshots}]
    if missing:
        have = ", ".join(str(snap.step) for snap in snapshots)
        raise ValueError(f"no snapshot at step {missing}; snapshots exist at steps {have}")
    print(
        f"{len(snapshots)} snapshots (steps {snapshots[0].step}..{snapshots[-1].step}, sigma_rel "
        f"{_widths(snapshots[-1].gammas)}) in {', '.join(map(str, folders))}"
    )
    for ckpt, fit, end in posthoc_checkpoints(cfg.ckpt, snapshots, widths, steps):
        sigma_rel = ckpt[BUNDLE_KEY]["posthoc_ema"]["sigma_rel"]
        path = out_dir / f"sigma_rel-{sigma_rel:.3f}-step_{end.step:07d}.ckpt"
        atomic_save(ckpt, path)
        print(
            f"sigma_rel {sigma_rel:.3f} (gamma {sigma_rel_to_gamma(sigma_rel):.2f}) at step "
            f"{end.step}: profile fit error {100 * fit.residual:.2f} % → {path}"
        )


def _widths(gammas) -> str:
    from ldm.training.posthoc_ema import gamma_to_sigma_rel

    return ", ".join(f"{gamma_to_sigma_rel(g):.3f}" for g in gammas)


if __name__ == "__main__":
    main()
