"""Where this process stands in a multi-process job, as its launcher (torchrun or Slurm's srun) says."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: torch.distributed's when initialized, else RANK / WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def gather_objects(obj) -> list:
    """`obj` of every rank, in rank order (`all_gather_object`); `[obj]` outside a multi-process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def collective_device() -> torch.device | None:
    """Where a tensor for a collective must live: CUDA under NCCL, else the CPU; None outside a multi-rank group."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
