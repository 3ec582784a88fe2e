"""One benchmark case in a fresh process: a UNet training step, a sampler run or a VAE encode, timed, with FLOPs,
MFU and peak memory. bench/run.py starts one process per case, so one case's peak memory, TF32/SDPA flags and
compile caches never leak into the next:

    python bench/train_step.py '{"size": "tiny", "batch": 8, "iters": 3}'     # prints one JSON line

Training step (kind "train"): x_t, t and a text context of the size's width → UNet → MSE against a random target
→ backward → AdamW step. Timed after `warmup` steps: forward, backward and optimizer step separately (synchronised
at each boundary; median of `iters`), and on CUDA also `iters` whole steps back to back (no synchronisation inside,
the images/s reported). FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` on a copy of the model
on the meta device (no compute; gradient checkpointing's recomputation not counted: model FLOPs). MFU = model
TFLOP/s ÷ peak: a GPU's data-sheet dense peak for the case's compute type (`ldm.utils.speed.PEAK_TFLOPS`);
on CPU, the rate of a 2048³ matmul measured in the same process, stated as such. Peak memory: CUDA
`max_memory_allocated`; on CPU, the process's peak resident set (ru_maxrss) minus its size before the model was
built: model, gradients, optimizer state and activations, plus allocator slack.
"""

from __future__ import annotations

import contextlib
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.models import CrossAttentionUNet  # noqa: E402
from ldm.utils.speed import compute_type, device_peak_tflops, sdpa_backend, set_tf32, to_channels_last  # noqa: E402

# name: UNet config file, overrides, latent side, text context (tokens, width), default batch per device type
SIZES: dict[str, dict] = {
    "tiny": {  # configs/unet/tiny.yaml (the quickstart narrows it to 48 channels) on 4×8×8 latents, tiny text tower
        "config": "tiny",
        "overrides": {},
        "latent": 8,
        "context": (32, 128),
        "batch": {"cpu": 64, "cuda": 256},
    },
    "mid": {  # SD2's layout at 192 channels, three levels, 256 px (32×32 latents), OpenCLIP-H width
        "config": "sd2_base",
        "overrides": {"model_channels": 192, "channel_mult": [1, 2, 4], "attention_resolutions": [1, 2]},
        "latent": 32,
        "context": (77, 1024),
        "batch": {"cpu": 4, "cuda": 64},
    },
    "sd2": {  # SD2-base (865.9M parameters) at 256 px
        "config": "sd2_base",
        "overrides": {},
        "latent": 32,
        "context": (77, 1024),
        "batch": {"cpu": 1, "cuda": 64},
    },
}


@dataclass
class Case:
    kind: str = "train"  # train | sample | encode
    size: str = "tiny"
    batch: int | None = None  # None: the size's default for the device
    iters: int = 10
    warmup: int = 3
    device: str = "auto"
    bf16: bool | None = None  # autocast to bf16; None: on CUDA with bf16 support, off on CPU
    channels_last: bool = False
    compile: bool = False
    sdpa: str = "auto"  # auto | flash | efficient | cudnn | math; strict: no fallback to math
    fused_adamw: bool | None = None  # None: on, as in training (optim.fused: null)
    tf32: bool = True
    grad_ckpt: bool = False
    sampler: str = "ddim"  # kind "sample": a configs/sampler/ name
    steps: int = 20  # kind "sample": sampler steps
    label: str = ""
    extra: dict = field(default_factory=dict)

    def resolve(self) -> Case:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(self.device).type
        if self.bf16 is None:
            self.bf16 = dev == "cuda" and torch.cuda.is_bf16_supported()
        if self.fused_adamw is None:
            self.fused_adamw = True
        if self.batch is None:
            self.batch = SIZES[self.size]["batch"][dev] if self.size in SIZES else 8
        return self


def unet_kwargs(size: str) -> dict:
    spec = SIZES[size]
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "unet" / f"{spec['config']}.yaml"))
    cfg.pop("_target_")
    cfg.update(spec["overrides"], in_channels=4, out_channels=4, context_dim=spec["context"][1])
    return cfg


def make_inputs(size: str, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x_t (B, 4, h, w), t (B,), context (B, L, D) and a target like x_t."""
    spec = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    side, (tokens, width) = spec["latent"], spec["context"]
    x = torch.randn(batch, 4, side, side, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, tokens, width, generator=g)
    target = torch.randn(batch, 4, side, side, generator=g)
    return tuple(v.to(device) for v in (x, t, context, target))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_fns(model: Callable, params, inputs, case: Case, device: torch.device):
    """forward() → loss; backward(loss); optimizer step (AdamW, fused or not) and zero_grad."""
    x, t, context, target = inputs
    opt = torch.optim.AdamW(params, lr=1e-4, fused=case.fused_adamw)

    def forward() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.bf16):
            out = model(x, t, context)
        return F.mse_loss(out.float(), target)

    def optimize() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return forward, lambda loss: loss.backward(), optimize


def time_steps(forward, backward, optimize, case: Case, device: torch.device) -> dict:
    for _ in range(case.warmup):
        backward(forward())
        optimize()
    split = {"fwd": [], "bwd": [], "opt": []}
    for _ in range(case.iters):
        sync(device)
        t0 = time.perf_counter()
        loss = forward()
        sync(device)
        t1 = time.perf_counter()
        backward(loss)
        sync(device)
        t2 = time.perf_counter()
        optimize()
        sync(device)
        t3 = time.perf_counter()
        for key, dt in (("fwd", t1 - t0), ("bwd", t2 - t1), ("opt", t3 - t2)):
            split[key].append(dt)
    totals = [sum(v) for v in zip(*split.values(), strict=True)]
    step_s = statistics.median(totals)
    if device.type == "cuda":  # whole steps, queued back to back: what training gets
        sync(device)
        t0 = time.perf_counter()
        for _ in range(case.iters):
            backward(forward())
            optimize()
        sync(device)
        step_s = (time.perf_counter() - t0) / case.iters
    out = {f"{k}_ms": 1e3 * statistics.median(v) for k, v in split.items()}
    return {**out, "step_ms": 1e3 * step_s, "images_per_s": case.batch / step_s}


def count_flops(size: str, batch: int) -> tuple[float, float]:
    """Forward and backward FLOPs of one training step (the model on the meta device: nothing is computed)."""
    with torch.device("meta"):
        model = CrossAttentionUNet(**unet_kwargs(size))
    x, t, context, target = (v.to("meta") for v in make_inputs(size, batch, torch.device("cpu")))
    with FlopCounterMode(display=False) as fwd:
        loss = F.mse_loss(model(x, t, context), target)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return float(fwd.get_total_flops()), float(bwd.get_total_flops())


def peak_tflops(case: Case, device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        compute = compute_type("bf16-mixed" if case.bf16 else "32-true", case.tf32)
        peak = device_peak_tflops(name, compute)
        return peak, f"{name} {compute} dense data sheet" if peak else f"{name}: not in PEAK_TFLOPS"
    dtype = "bf16" if case.bf16 else "fp32"
    peak = case.extra.get("cpu_peak", {}).get(dtype) or cpu_matmul_tflops(dtype)
    return peak, f"measured {dtype} 2048³ matmul, this CPU"


def cpu_matmul_tflops(dtype: str = "fp32", n: int = 2048) -> float:
    """The best of 4 `n`³ matmuls on this CPU, in TFLOP/s: the CPU's practical peak, for MFU there."""
    a, b = (torch.randn(n, n, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]) for _ in range(2))
    best = float("inf")
    for _ in range(4):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


class Memory:
    """Peak memory of what runs between `start()` and `peak_gb()` (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.source = (
            "cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS delta (ru_maxrss)"
        )

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base) / 2**30


def run_train(case: Case, device: torch.device) -> dict:
    memory = Memory(device)
    memory.start()
    torch.manual_seed(0)
    # initialised where it runs: the SD2-size UNet's CPU init is seconds a GPU case need not spend
    with device:
        unet = CrossAttentionUNet(**{**unet_kwargs(case.size), "gradient_checkpointing": case.grad_ckpt})
    x, t, context, target = make_inputs(case.size, case.batch, device)
    if case.channels_last:
        to_channels_last(unet)
        x = x.contiguous(memory_format=torch.channels_last)
    if case.compile:
        unet.compile()
    forward, backward, optimize = step_fns(unet, unet.parameters(), (x, t, context, target), case, device)
    timings = time_steps(forward, backward, optimize, case, device)
    # the steps' peak, read before the FLOP count and a CPU peak measured here (no cpu_peak given) add theirs
    peak_mem = memory.peak_gb()
    fwd_flops, bwd_flops = count_flops(case.size, case.batch)
    tflops = (fwd_flops + bwd_flops) / (timings["step_ms"] / 1e3) / 1e12
    peak, source = peak_tflops(case, device)
    return {
        **timings,
        "params_M": sum(p.numel() for p in unet.parameters()) / 1e6,
        "latent": SIZES[case.size]["latent"],
        "gflop_fwd": fwd_flops / 1e9,
        "gflop_bwd": bwd_flops / 1e9,
        "tflops": tflops,
        "peak_tflops": peak,
        "peak_source": source,
        "mfu": tflops / peak if peak else None,
        "peak_mem_gb": peak_mem,
        "mem_source": memory.source,
    }


def run_sample(case: Case, device: torch.device) -> dict:
    """Latents → `case.steps` sampler steps with classifier-free guidance (cond and uncond batched in one call,
    as at inference) → latents; no VAE decode. Images/s = batch ÷ median seconds per run."""
    from hydra.utils import instantiate

    from ldm.conditioning import Conditioning
    from ldm.diffusion import classifier_free_guidance
    from ldm.inference import unet_denoiser

    memory = Memory(device)
    memory.start()
    torch.manual_seed(0)
    unet = CrossAttentionUNet(**unet_kwargs(case.size)).to(device).eval().requires_grad_(False)
    if case.channels_last:
        to_channels_last(unet)
    if case.compile:
        unet.compile()
    diffusion = instantiate(OmegaConf.load(ROOT / "configs" / "diffusion" / "scaled_linear_eps.yaml")).to(
        device
    )
    sampler_cfg = OmegaConf.load(ROOT / "configs" / "sampler" / f"{case.sampler}.yaml")
    sampler_cfg.num_steps = case.steps
    sampler = instantiate(sampler_cfg)
    x, _, context, _ = make_inputs(case.size, case.batch, device)
    calls = [0]
    denoise = unet_denoiser(unet)

    def counted(x_t, t, cond):
        calls[0] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.bf16):
            return denoise(x_t, t, cond).float()

    model_fn = classifier_free_guidance(
        counted, Conditioning(context), Conditioning(torch.zeros_like(context)), 5.0, cat=Conditioning.cat
    )
    seconds = []
    for i in range(case.warmup + case.iters):
        calls[0] = 0
        sync(device)
        t0 = time.perf_counter()
        sampler(model_fn, diffusion, x.clone())
        sync(device)
        if i >= case.warmup:
            seconds.append(time.perf_counter() - t0)
    median = statistics.median(seconds)
    return {
        "model_calls": calls[0],
        "seconds_per_run": median,
        "ms_per_call": 1e3 * median / calls[0],
        "images_per_s": case.batch / median,
        "peak_mem_gb": memory.peak_gb(),
        "mem_source": memory.source,
    }


def run_encode(case: Case, device: torch.device) -> dict:
    """The SD KL-f8 autoencoder's encoder on 256-px images (what a run on raw images pays per step), no grad."""
    from ldm.models import KLAutoencoder

    arch = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "autoencoder" / "kl_f8.yaml"))
    arch.pop("_target_")
    memory = Memory(device)
    memory.start()
    torch.manual_seed(0)
    vae = KLAutoencoder(**arch).to(device).eval().requires_grad_(False)
    images = torch.randn(case.batch, 3, 256, 256, device=device)
    if case.channels_last:
        to_channels_last(vae)
        images = images.contiguous(memory_format=torch.channels_last)
    if case.compile:
        vae.encoder.compile()
    seconds = []
    for i in range(case.warmup + case.iters):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.bf16):
            vae.encode(images).sample()
        sync(device)
        if i >= case.warmup:
            seconds.append(time.perf_counter() - t0)
    median = statistics.median(seconds)
    return {"images_per_s": case.batch / median, "ms": 1e3 * median, "peak_mem_gb": memory.peak_gb()}


def run_case(case: Case) -> dict:
    case.resolve()
    device = torch.device(case.device)
    set_tf32(case.tf32)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = {"case": asdict(case), "device_name": device_name(device)}
    try:
        with sdpa_backend(case.sdpa, fallback=False):
            run = {"train": run_train, "sample": run_sample, "encode": run_encode}[case.kind]
            result.update(run(case, device))
    except (RuntimeError, ValueError) as err:  # out of memory, no kernel for this sdpa choice, ...
        message = str(err).strip().splitlines()[0].split(". ")[0][:200]
        result["error"] = "out of memory" if "out of memory" in message.lower() else message
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "CPU"


def main() -> None:
    spec = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    print(json.dumps(run_case(Case(**spec))), flush=True)


if __name__ == "__main__":
    main()
