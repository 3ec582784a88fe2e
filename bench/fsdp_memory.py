"""Training state per rank under DDP and under `strategy=fsdp`'s sharding plan, and the step time of each.

    python bench/fsdp_memory.py --size mid --ranks 2 --strategy fsdp     # prints one JSON line

Starts `ranks` processes (gloo on CPU, NCCL with one GPU each on CUDA). Each builds the same UNet (bench/train_step.py
SIZES), its EMA copy and AdamW (fused), then either wraps the UNet in DDP or shards UNet and EMA with
`ldm.training.fsdp.shard_network` (the plan `strategy=fsdp` applies), and runs `steps` training steps plus an EMA
update each. Reported per rank (rank 0's; all ranks hold the same amounts up to one shard's rounding):

- state_gb: bytes held by this rank's parameters, gradients, AdamW moments and EMA weights after a step, counted
  tensor by tensor (a shard counts its local part). Exact and machine-independent: what sharding divides.
- peak_gb: on CUDA `max_memory_allocated`; on CPU the peak resident set minus its size before the model was built
  (state, activations, gathered blocks and allocator slack).
- step_ms: median step (forward, backward, optimizer step, EMA update) after one untimed step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_step import SIZES, make_inputs, unet_kwargs  # noqa: E402
from ldm.models import CrossAttentionUNet  # noqa: E402
from ldm.training.fsdp import shard_network  # noqa: E402


def _local_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _worker(rank: int, args: argparse.Namespace, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.ranks)
    base = _rss_gb()
    torch.manual_seed(0)
    unet = CrossAttentionUNet(**unet_kwargs(args.size)).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    if args.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (args.ranks,))
        shard_network(unet, mesh=mesh)
        shard_network(ema, mesh=mesh)
        model = unet
    else:
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[rank] if cuda else None)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    x, t, context, target = make_inputs(args.size, args.batch, device, seed=rank)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step() -> None:
        with autocast:
            loss = F.mse_loss(model(x, t, context).float(), target)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in unet.parameters()], 1e-3)

    times = []
    for i in range(args.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as in training
    state = sum(_local_bytes(p) + _local_bytes(p.grad) for p in unet.parameters())
    state += sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values() if v.ndim)
    state += sum(_local_bytes(p) for p in ema.parameters())
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else _rss_gb() - base
    if rank == 0:
        params = sum(p.numel() for p in CrossAttentionUNet(**unet_kwargs(args.size)).parameters())
        result = {
            "size": args.size,
            "strategy": args.strategy,
            "ranks": args.ranks,
            "batch": args.batch,
            "bf16": args.bf16,
            "params": params,
            "state_gb": state / 2**30,
            "peak_gb": peak,
            "peak_source": "cuda max_memory_allocated" if cuda else "cpu peak RSS delta (ru_maxrss)",
            "step_ms": 1e3 * statistics.median(times),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        }
        out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run(size: str, strategy: str, ranks: int, batch: int, steps: int, bf16: bool, port: int = 29617) -> dict:
    args = argparse.Namespace(size=size, strategy=strategy, ranks=ranks, batch=batch, steps=steps, bf16=bf16)
    out = Path(f"/tmp/ldm-fsdp-bench-{os.getpid()}.json")
    mp.start_processes(_worker, args=(args, port, out), nprocs=ranks, start_method="spawn")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="mid", choices=sorted(SIZES))
    parser.add_argument("--strategy", default="fsdp", choices=["ddp", "fsdp"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    print(
        json.dumps(run(args.size, args.strategy, args.ranks, args.batch, args.steps, args.bf16)), flush=True
    )


if __name__ == "__main__":
    main()
