"""Our UNet against `diffusers.UNet2DConditionModel` built with the same widths: one training step each
(forward, MSE, backward, AdamW), same batch, same inputs, timed interleaved.

    python bench/run.py diffusers [--sizes tiny,mid] [--quick]          # the entry point (JSON + markdown)
    python bench/diffusers_unet.py --sizes tiny --rounds 5 --profile     # this file alone; --profile: top ops

The twin is the network `scripts/export.py` writes for diffusers (`diffusers_unet_config`): `block_out_channels` =
model_channels × channel_mult, `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D` where our `attention_resolutions` put
a transformer, `layers_per_block` = num_res_blocks, heads per level (diffusers' `attention_head_dim` is a head
count), linear projections in the transformers (SD2), SD's sinusoidal time embedding, GroupNorm eps 1e-5. With the
same weights it computes the same function (tests/test_convert_unet.py).

Timing: `--rounds` rounds after `--warmup` steps of each; in round r both models run `--steps` steps, ours first
in even rounds and theirs first in odd ones (ABBA: slow drift of a shared machine hits both alike). The speed
ratio is the median over rounds of (their step time ÷ ours): > 1 means ours is faster. diffusers is an optional
benchmark dependency (the `dev` extra), not needed by ldm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_step import SIZES, Case, make_inputs, step_fns, sync, unet_kwargs  # noqa: E402
from ldm.models import CrossAttentionUNet  # noqa: E402
from ldm.models.convert_unet import diffusers_unet_config  # noqa: E402
from ldm.utils.speed import set_tf32, to_channels_last  # noqa: E402


def diffusers_twin(kwargs: dict):
    """`UNet2DConditionModel` with the architecture of `CrossAttentionUNet(**kwargs)`: the config the diffusers
    export writes (`ldm.models.convert_unet.diffusers_unet_config`; tests/test_convert_unet.py checks that the
    same weights give the same outputs in both)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ours = CrossAttentionUNet(**kwargs)
    return UNet2DConditionModel(**diffusers_unet_config(ours, sample_size=32))


def _theirs_fn(model):
    def call(x, t, context):
        return model(x, t, encoder_hidden_states=context, return_dict=False)[0]

    return call


def compare(size: str, case: Case, rounds: int, steps: int, profile: bool = False) -> dict:
    """Param counts and the interleaved step timing of ours vs diffusers for one size (see the module doc)."""
    import diffusers

    case.resolve()
    device = torch.device(case.device)
    set_tf32(case.tf32)
    kwargs = unet_kwargs(size)
    torch.manual_seed(0)
    ours = CrossAttentionUNet(**kwargs).to(device)
    theirs = diffusers_twin(kwargs).to(device)
    x, t, context, target = make_inputs(size, case.batch, device)
    if case.channels_last:
        to_channels_last(ours), to_channels_last(theirs)
        x = x.contiguous(memory_format=torch.channels_last)
    if case.compile:
        ours.compile(), theirs.compile()
    models = {"ours": ours, "diffusers": theirs}
    calls = {"ours": ours, "diffusers": _theirs_fn(theirs)}
    fns = {
        k: step_fns(calls[k], models[k].parameters(), (x, t, context, target), case, device) for k in models
    }

    def step(name: str, n: int) -> float:
        forward, backward, optimize = fns[name]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            backward(forward())
            optimize()
        sync(device)
        return (time.perf_counter() - t0) / n

    for name in models:
        if case.warmup:  # --warmup 0: none (and no division by zero)
            step(name, case.warmup)
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for r in range(rounds):
        order = ("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")
        for name in order:
            times[name].append(step(name, steps))
    ratios = [b / a for a, b in zip(times["ours"], times["diffusers"], strict=True)]
    result = {
        "size": size,
        "batch": case.batch,
        "latent": SIZES[size]["latent"],
        "device": case.device,
        "bf16": case.bf16,
        "channels_last": case.channels_last,
        "diffusers": diffusers.__version__,
        "params_ours": sum(p.numel() for p in ours.parameters()),
        "params_diffusers": sum(p.numel() for p in theirs.parameters()),
        "ours_step_ms": 1e3 * statistics.median(times["ours"]),
        "diffusers_step_ms": 1e3 * statistics.median(times["diffusers"]),
        "speed_ratio": statistics.median(ratios),
        "ratios": ratios,
        "rounds": rounds,
        "steps_per_round": steps,
    }
    if profile:
        result["profile"] = {name: top_ops(fns[name], device) for name in models}
    return result


def top_ops(fns, device: torch.device, n: int = 12) -> list[dict]:
    """The `n` ops with the most self time over two training steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    forward, backward, optimize = fns
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            backward(forward())
            optimize()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"op": e.key, "ms": getattr(e, key) / 2e3, "calls": e.count // 2} for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="tiny,mid")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="steps per model per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    for size in args.sizes.split(","):
        case = Case(size=size, batch=args.batch, warmup=args.warmup, channels_last=args.channels_last)
        print(json.dumps(compare(size, case, args.rounds, args.steps, args.profile), indent=1), flush=True)


if __name__ == "__main__":
    main()
