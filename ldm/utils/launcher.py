"""Where this process stands in a multi-process job, as its launcher (torchrun or Slurm's srun) says."""

from __future__ import annotations

import os


def launcher_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun (RANK / WORLD_SIZE / LOCAL_RANK) or srun (SLURM_PROCID /
    SLURM_NTASKS / SLURM_LOCALID); (0, 1, 0) for a process started on its own."""
    for rank, world, local in (
        ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ):
        if os.environ.get(rank, "").strip() and os.environ.get(world, "").strip():
            return int(os.environ[rank]), int(os.environ[world]), int(os.environ.get(local) or 0)
    return 0, 1, 0
