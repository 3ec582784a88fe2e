"""Several processes (all GPUs of a node, a Slurm job) evaluating together.

Rank and world size come from an initialised process group, else from the launcher's environment: torchrun
(RANK / WORLD_SIZE / LOCAL_RANK) or Slurm's srun (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID). Results are
reduced with torchmetrics, which syncs its states over the default process group when there is one.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ldm.utils.launcher import launcher_rank


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_context() -> DistContext:
    """This process's place: from the process group if one is initialised, else from the launcher's env."""
    rank, world_size, local = launcher_rank()
    if is_distributed():
        return DistContext(dist.get_rank(), dist.get_world_size(), local)
    return DistContext(rank, world_size, local)


def init_distributed(timeout_minutes: float = 60.0) -> DistContext:
    """Join the process group the environment describes (gloo on CPU, nccl on GPU); a no-op for one process.

    Under srun without torchrun, MASTER_ADDR defaults to the job's first node and MASTER_PORT to one derived
    from the job id. The timeout is long because rank 0 may compute reference statistics while others wait.
    """
    ctx = dist_context()
    if ctx.world_size <= 1 or is_distributed():
        return ctx
    if "SLURM_JOB_ID" in os.environ:
        os.environ.setdefault("MASTER_ADDR", _slurm_first_node())
        os.environ.setdefault("MASTER_PORT", str(15000 + int(os.environ["SLURM_JOB_ID"]) % 20000))
    if torch.cuda.is_available():
        torch.cuda.set_device(ctx.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        rank=ctx.rank,
        world_size=ctx.world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    return ctx


def _slurm_first_node() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "localhost"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(",")[0]


def resolve_device(spec: str, ctx: DistContext) -> torch.device:
    """ "auto": this process's GPU (LOCAL_RANK) if there is one, else CPU."""
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class IndexedFeatures(Metric):
    """Features of images (and, for Inception, logits), each with its index in the evaluation set, gathered over
    processes and returned in index order: KID subsets, IS splits and precision/recall ties depend on the order of
    samples, and sorting makes them independent of how images were shared out."""

    full_state_update = False
    is_differentiable = False
    index: list[Tensor]
    features: list[Tensor]
    logits: list[Tensor]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("index", [], dist_reduce_fx="cat")
        self.add_state("features", [], dist_reduce_fx="cat")
        self.add_state("logits", [], dist_reduce_fx="cat")

    def update(self, index: Tensor, features: Tensor, logits: Tensor | None = None) -> None:
        self.index.append(index.to(self.device, torch.long))
        self.features.append(features.float())
        self.logits.append(features.new_zeros(len(features), 0) if logits is None else logits.float())

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        """(index (N,), features (N, D), logits (N, L); L = 0 without logits) sorted by index."""
        if isinstance(self.index, list) and not self.index:  # after a sync the states are tensors
            raise ValueError("no images were scored")
        index = dim_zero_cat(self.index)
        order = torch.argsort(index)
        return index[order], dim_zero_cat(self.features)[order], dim_zero_cat(self.logits)[order]
