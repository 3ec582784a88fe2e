"""Fully sharded data parallel training of the UNet (FSDP2, `torch.distributed.fsdp.fully_shard`).

DDP keeps a whole copy of the UNet, its gradients, its AdamW moments and its EMA on every GPU: 16 bytes per
parameter plus 4 for the EMA, 17 GB for SD2's 866M UNet before a single activation. `strategy=fsdp` shards all of
them over the ranks (or, with `hybrid: true`, over the GPUs of one node, replicated across nodes), so each GPU
holds 1/N of them and gathers one block's weights at a time for its forward and backward.

What is sharded: each UNet block (`CrossAttentionUNet.blocks()`, the unit of all-gather and of resharding) and
the UNet itself for the parameters outside the blocks, and the EMA copy the same way, so the EMA update is a
local operation on each rank's shard. The frozen text encoder and autoencoder stay whole on every rank.

Checkpoints: one file, gathered on rank 0 (host memory, shard by shard), in the same format as a DDP run's:
sample.py, eval, export and `init_from` read it, and a run can switch between DDP and FSDP on resume. Lightning's
folders of per-rank shards (torch.distributed.checkpoint) are not offered: no other tool of ldm reads them, and
resuming from one skipped what a checkpoint leaves out on purpose (a pretrained text encoder; post-hoc EMA switched
on or off). The full state of an SD2-size UNet run is ~14 GB, of an SDXL-size one ~42 GB: a GPU node's memory holds
either.

Works on CPU too (gloo), which is how the tests run it; Lightning's own `FSDPStrategy` (FSDP1) refuses a CPU."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

log = logging.getLogger(__name__)

_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class UNetFSDPStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with the sharding plan of ldm's modules applied for it.

    reshard_after_forward: free a block's gathered weights after its forward (gather again for backward): less
        memory, one more all-gather per block per step. False keeps them until backward (ZeRO-2-like).
    param_dtype / reduce_dtype: FSDP's own mixed precision: weights gathered and computed in `param_dtype`,
        gradients reduced in `reduce_dtype` (bf16 | fp16 | fp32 | null). null: the fp32 master weights are gathered
        and `trainer.precision` (autocast) decides the compute dtype.
    cpu_offload: keep the sharded parameters, gradients and optimizer state in host memory (slow; for models that
        do not fit even sharded).
    hybrid: shard within each node and replicate across nodes (HSDP): all-gathers stay on the node's fast links.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        cpu_offload: bool = False,
        hybrid: bool = False,
        process_group_backend: str | None = None,
        timeout_minutes: float = 30.0,
    ) -> None:
        for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value not in _DTYPES:
                raise ValueError(f"strategy.{name} must be one of {sorted(map(str, _DTYPES))}, got {value!r}")
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,  # one file, in the DDP format (see the module's docstring)
            process_group_backend=process_group_backend,
            timeout=timedelta(minutes=timeout_minutes),
        )
        self.reshard_after_forward, self.cpu_offload, self.hybrid = reshard_after_forward, cpu_offload, hybrid
        self.param_dtype, self.reduce_dtype = _DTYPES[param_dtype], _DTYPES[reduce_dtype]
        self._sharded: set[int] = set()

    def setup_environment(self) -> None:
        # one data-parallel dimension over every rank (the parent's default is nodes × GPUs-per-node as DP × TP)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def describe(self) -> dict:
        """What the logged config records of the sharding."""
        return {
            "fsdp_ranks": self.num_nodes * self.num_processes,
            "fsdp_shard_group": self.num_processes if self.hybrid else self.num_nodes * self.num_processes,
            "fsdp_param_dtype": str(self.param_dtype).removeprefix("torch.") if self.param_dtype else None,
            "fsdp_reshard_after_forward": self.reshard_after_forward,
        }

    # --- sharding -----------------------------------------------------------------------------------------------
    def shard(self, module: nn.Module) -> None:
        """Apply the plan to `module` (a LightningModule with `sharded_networks()`); called from its
        `configure_model`, once per network however often Lightning calls that hook."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        networks = getattr(module, "sharded_networks", None)
        if networks is None:
            raise TypeError(
                f"strategy=fsdp shards the UNet of stage 2; {type(module).__name__} has no sharding plan "
                "(train stage 1 with the default DDP strategy)"
            )
        todo = [net for net in networks() if id(net) not in self._sharded]
        if not todo:
            return
        module.to(self.root_device)  # the frozen parts stay whole; the strategy does not move them itself
        if self.hybrid and self.num_nodes > 1:
            mesh = init_device_mesh(
                self.root_device.type,
                (self.num_nodes, self.num_processes),
                mesh_dim_names=("replicate", "shard"),
            )
        else:
            mesh = self.device_mesh["data_parallel"]
        kwargs: dict[str, Any] = {
            "mesh": mesh,
            "reshard_after_forward": self.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype),
            "offload_policy": CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy(),
        }
        names = ", ".join(f"{type(net).__name__} ({len(net.blocks())} blocks)" for net in todo)
        for net in todo:
            shard_network(net, **kwargs)
            self._sharded.add(id(net))
        log.info("FSDP: sharded %s over %s", names, mesh)

    # --- checkpoints --------------------------------------------------------------------------------------------
    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The full optimizer state on rank 0 in `torch.optim.Optimizer.state_dict()`'s own format (parameters
        numbered in param-group order), as a DDP run saves it; empty on the other ranks."""
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, optimizer, options=options)
        if self.global_rank != 0:
            return state
        index = {name: i for i, name in enumerate(_names_in_group_order(self.model, optimizer))}
        return {
            "state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
        }

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """A full checkpoint file (this strategy's default, or a DDP run's) is read through the run's
        CheckpointIO (weights_only) on every rank and scattered into the shards; a folder goes to the parent."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            raise ValueError(f"{path} is a folder: ldm resumes from checkpoint files (checkpoints/*.ckpt)")
        checkpoint = self.checkpoint_io.load_checkpoint(path)
        module = self.lightning_module
        state = checkpoint["state_dict"]
        # keys a checkpoint leaves out on purpose (a pretrained text encoder) come from the module
        module.complete_state_dict(state)
        options = StateDictOptions(full_state_dict=True, strict=module.strict_loading)
        set_model_state_dict(self.model, state, options=options)
        saved = checkpoint.get("optimizer_states", [])
        if len(saved) != len(self.optimizers):
            raise ValueError(f"{path} has {len(saved)} optimizer states; this run has {len(self.optimizers)}")
        for optimizer, optim_state in zip(self.optimizers, saved, strict=True):
            named = _state_by_name(optim_state, optimizer, self.model, path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=named, options=options)
        return checkpoint


def shard_network(net: nn.Module, **fully_shard_kwargs) -> None:
    """The sharding plan: each of `net.blocks()` one FSDP unit (gathered for its forward and backward, then freed),
    `net` itself the root unit for the parameters outside the blocks.

    The root does not cast its inputs to `param_dtype`: they include the timesteps, which a flow model gives as
    floats in [0, 1000] (bf16 steps by 4 between 512 and 1024, so t = 815.3 reached the UNet as 816) and the
    micro-conditioning sizes; the UNet casts its embeddings to its weights' dtype itself, and each block unit
    still casts the activations it is given."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for block in net.blocks():
        fully_shard(block, **fully_shard_kwargs)
    root_kwargs = dict(fully_shard_kwargs)
    policy = root_kwargs.get("mp_policy")
    if policy is not None:
        root_kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=policy.param_dtype,
            reduce_dtype=policy.reduce_dtype,
            output_dtype=policy.output_dtype,
            cast_forward_inputs=False,
        )
    fully_shard(net, **root_kwargs)


def _names_in_group_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def _state_by_name(saved: dict, optimizer: torch.optim.Optimizer, model: nn.Module, path: Path) -> dict:
    """An `Optimizer.state_dict()` (numbered parameters) keyed by parameter name instead, matching the saved
    groups to this optimizer's groups by position, as `Optimizer.load_state_dict` does."""
    saved_sizes = [len(g["params"]) for g in saved["param_groups"]]
    own_sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != own_sizes:
        raise ValueError(
            f"{path}: optimizer parameter groups of sizes {saved_sizes}; this run's are {own_sizes}"
        )
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    by_id = dict(zip(ids, _names_in_group_order(model, optimizer), strict=True))
    return {
        "state": {by_id[i]: value for i, value in saved["state"].items()},
        "param_groups": [{**g, "params": [by_id[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def is_sharded(strategy) -> bool:
    """Whether the UNet's forward is a collective (every rank must call it): `strategy=fsdp`."""
    return isinstance(strategy, UNetFSDPStrategy)


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value as the whole tensor on every rank; any other tensor unchanged."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def compile_blocks(blocks: list[nn.Module], num_sizes: int = 1, backend: str = "inductor") -> None:
    """torch.compile each block on its own, with static shapes (under FSDP the gather/free hooks stay between the
    compiled graphs), with room in dynamo's cache for every graph the run makes.

    Dynamo keeps at most `recompile_limit` (8) graphs per code object and runs a frame past it eagerly, for the
    rest of the process. Every UNet block runs the same `EmbedSequential.forward`, and blocks of another structure
    or input shape each need their own graph: an SD2-layout UNet makes 20 graphs at one latent size (tests/
    test_fsdp.py), so with the default only 8 blocks ran compiled. Each training size (aspect-ratio bucket)
    multiplies that, and so do gradient mode and batch size (sample grids, a last partial batch): the limits are
    raised to blocks × 2 × (sizes + 2) graphs."""
    needed = len(blocks) * 2 * (num_sizes + 2)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, needed)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, needed)
    for block in blocks:
        block.compile(dynamic=False, backend=backend)
