"""The benchmark suite's one entry point: results as JSON in bench/results/ and a markdown section appended to
docs/benchmarks.md (machine, versions, command).

    python bench/run.py train        # UNet training step per size: fwd/bwd/optimizer split, img/s, TFLOP/s, MFU, memory
    python bench/run.py fastpaths    # each fast path on/off against the defaults (+ largest batch, on GPU)
    python bench/run.py sampling     # images/s per sampler (UNet + sampler, classifier-free guidance, no decode)
    python bench/run.py diffusers    # our UNet vs diffusers.UNet2DConditionModel of the same widths (bench/diffusers_unet.py)
    python bench/run.py loader       # data-loader throughput (bench/loader.py)
    python bench/run.py fsdp         # training state and memory per rank, DDP vs strategy=fsdp (bench/fsdp_memory.py)
    python bench/run.py ema          # EMA and post-hoc EMA update per step, snapshot size and write time
    python bench/run.py eval         # evaluation: Inception / DINOv2 features per image, precision/recall time
    python bench/run.py all          # all of the above
    python bench/run.py lease --budget 420   # a GPU lease's run: the SD2-size cases first, whatever fits the budget
    python bench/run.py <mode> --quick   # a smoke run in seconds: tiny size, 2 iterations; JSON to /tmp, no markdown

Sizes (bench/train_step.py SIZES): tiny (the CPU quickstart's 4.3M UNet, 8×8 latents), mid (SD2 layout at 192
channels, 165M, 32×32 latents = 256 px) and sd2 (SD2-base, 865.9M, 256 px). Defaults: tiny,mid on CPU,
tiny,mid,sd2 on a GPU. The device is CUDA when there is one (bf16 autocast, fused AdamW, TF32: the training
defaults there), else the CPU (fp32). Every train/sampling case runs in its own process (bench/train_step.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_step import SIZES, Case, cpu_matmul_tflops, device_name  # noqa: E402

SAMPLERS = ("ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_karras")
SDPA = ("flash", "efficient", "cudnn", "math")


NOT_RUN = "not run: --budget spent"
_deadline: float | None = None  # time.monotonic() past which spawn() starts no case (--budget)


def spawn(case: dict, timeout: float = 3600) -> dict:
    """One case of bench/train_step.py in a fresh process; its JSON result (or the error it died of).
    Under --budget a case gets at most the time left, and none when under 20 s is left."""
    if _deadline is not None:
        left = _deadline - time.monotonic()
        if left < 20:
            return {"case": case, "error": NOT_RUN}
        timeout = min(timeout, left)
    cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"case": case, "error": f"exit {proc.returncode}: {tail[:300]}"}
    result = json.loads(lines[-1])
    print(_line(result), flush=True)
    return result


def _line(r: dict) -> str:
    c = r["case"]
    what = f"{c['kind']} {c['size']} b{c['batch']} {c.get('label') or ''}".strip()
    return f"  {what}: " + (r["error"] if "error" in r else f"{r['images_per_s']:.2f} img/s")


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def _base(args, size: str, **extra) -> dict:
    case = {
        "size": size,
        "iters": args.iters,
        "warmup": args.warmup,
        "extra": {"cpu_peak": args.cpu_peak},
        **extra,
    }
    if args.batch:
        case["batch"] = args.batch
    elif args.quick:
        case["batch"] = {"tiny": 8, "mid": 1, "sd2": 1}[size] if not _on_gpu() else 8
    return case


# ---------------------------------------------------------------- modes


def mode_train(args) -> tuple[list[dict], list[str]]:
    results = [spawn(_base(args, size)) for size in args.sizes]
    header = (
        "| size | params (M) | latent | batch | precision | fwd ms | bwd ms | opt ms | step ms | img/s "
        "| GFLOP/img (fwd+bwd) | TFLOP/s | MFU | peak mem (GB) |"
    )
    rows = [header, "|" + " --- |" * 14]
    for r in results:
        c = r["case"]
        if "error" in r:
            rows.append(f"| {c['size']} | | | {c.get('batch', '')} | | | | | | {r['error']} | | | | |")
            continue
        gflop = (r["gflop_fwd"] + r["gflop_bwd"]) / c["batch"]
        rows.append(
            f"| {c['size']} | {r['params_M']:.1f} | {r['latent']}×{r['latent']} | {c['batch']} | {_precision(c)} "
            f"| {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | {r['opt_ms']:.1f} | {r['step_ms']:.1f} "
            f"| **{r['images_per_s']:.2f}** | {gflop:.2f} | {r['tflops']:.3f} | {_mfu(r)} | {r['peak_mem_gb']:.2f} |"
        )
    notes = [_peak_note(results), f"Peak memory: {_mem_note(results)}."]
    return results, rows + [""] + notes


def fast_path_variants(gpu: bool, with_compile: bool) -> list[tuple[str, dict]]:
    """(label, case overrides) against the defaults: each switch flipped from its default."""
    base = Case(device="cuda" if gpu else "cpu").resolve()
    variants = [
        ("defaults", {}),
        ("channels_last", {"channels_last": True}),
        *((f"sdpa={name} (strict)", {"sdpa": name}) for name in SDPA),
        (f"fused AdamW {'off' if base.fused_adamw else 'on'}", {"fused_adamw": not base.fused_adamw}),
        (f"bf16 autocast {'off' if base.bf16 else 'on'}", {"bf16": not base.bf16}),
        ("TF32 off", {"tf32": False}),
        ("gradient checkpointing", {"grad_ckpt": True}),
    ]
    if with_compile:
        # right after the defaults: on a GPU the biggest open question, so it runs first under --budget
        variants[1:1] = [
            ("torch.compile", {"compile": True}),
            ("compile + channels_last", {"compile": True, "channels_last": True}),
        ]
    return variants


def max_batch(args, size: str, grad_ckpt: bool, fits: int | None = None, timed: dict | None = None) -> dict:
    """Largest power-of-two batch (from the size's default up, or above `fits`, a batch known to fit) whose
    training step fits, then timed at it. `timed`: a result with these settings already timed at `fits` (the
    defaults row), relabelled when no larger batch fits instead of timed again."""
    known = fits
    batch = 2 * fits if fits else SIZES[size]["batch"]["cuda"]
    while batch <= 4096:
        probe = spawn({**_base(args, size), "batch": batch, "iters": 2, "warmup": 1, "grad_ckpt": grad_ckpt})
        if "error" in probe:
            break
        fits, batch = batch, batch * 2
    if fits is None:
        return probe
    label = f"largest batch{' + gradient checkpointing' if grad_ckpt else ''}"
    if fits == known and timed is not None:
        return {**timed, "case": {**timed["case"], "label": label}}
    return spawn({**_base(args, size), "batch": fits, "grad_ckpt": grad_ckpt, "label": label})


def _faster_than_defaults(results: list[dict], size: str, label: str) -> bool:
    rate = {r["case"]["label"]: r.get("images_per_s", 0.0) for r in results if r["case"]["size"] == size}
    return rate.get(label, 0.0) > rate.get("defaults", float("inf"))


def mode_fastpaths(args) -> tuple[list[dict], list[str]]:
    gpu = _on_gpu()
    search = gpu and not args.quick  # the largest batch that fits: only where memory is the limit
    results = []
    for size in args.fast_sizes:
        (defaults, _), *variants = fast_path_variants(gpu, args.compile or search)
        results.append(spawn({**_base(args, size), "label": defaults}))
        fits = None if "error" in results[-1] else results[-1]["case"]["batch"]
        largest = max_batch(args, size, False, fits, results[-1]) if search else None
        if largest is not None:  # issue 8's headline (SD2, 256 px, the largest batch) before the variants
            results.append(largest)
        for label, overrides in variants:
            results.append(spawn({**_base(args, size), **overrides, "label": label}))
        # at the defaults' batch, compiled is the torch.compile row already timed
        bigger = largest and "error" not in largest and largest["case"]["batch"] != fits
        if bigger and _faster_than_defaults(results, size, "torch.compile"):
            # the best this GPU does: compiled at the largest eager batch (compiling needs no more memory)
            label = "largest batch + torch.compile"
            results.append(spawn({**largest["case"], "compile": True, "label": label}))
        if search:  # checkpointing needs less memory: start above the largest batch that fits without it
            above = largest["case"]["batch"] if "error" not in largest else None
            results.append(max_batch(args, size, grad_ckpt=True, fits=above))
        if gpu or args.encode:  # the VAE encoder of runs on raw images (CPU: slow, only with --encode)
            for label, overrides in (
                ("VAE encode (kl_f8, 256 px)", {}),
                ("VAE encode, compiled", {"compile": True}),
            ):
                batch = {"batch": 1 if args.quick else (32 if gpu else 4)}
                results.append(
                    spawn({**_base(args, size), "kind": "encode", **batch, **overrides, "label": label})
                )
    rows = [
        "| size | variant | batch | img/s | vs defaults | TFLOP/s | MFU | peak mem (GB) |",
        "|" + " --- |" * 8,
    ]
    base = {  # the reference row of each size and kind: the defaults (plain encoder)
        (r["case"]["size"], r["case"]["kind"]): r["images_per_s"]
        for r in results
        if "error" not in r and r["case"]["label"] in ("defaults", "VAE encode (kl_f8, 256 px)")
    }
    for r in results:
        c = r["case"]
        if "error" in r:
            rows.append(f"| {c['size']} | {c['label']} | {c.get('batch', '')} | {r['error']} | | | | |")
            continue
        reference = base.get((c["size"], c["kind"]))
        ratio = r["images_per_s"] / reference if reference else float("nan")
        tflops = f"{r['tflops']:.3f}" if "tflops" in r else ""
        rows.append(
            f"| {c['size']} | {c['label']} | {c['batch']} | {r['images_per_s']:.2f} | **{ratio:.2f}×** | {tflops} "
            f"| {_mfu(r)} | {r['peak_mem_gb']:.2f} |"
        )
    defaults = Case(device="cuda" if gpu else "cpu").resolve()
    notes = [
        f"Defaults: bf16 autocast {'on' if defaults.bf16 else 'off'}, fused AdamW {'on' if defaults.fused_adamw else 'off'}, "
        "TF32 on, sdpa auto, channels_last off, no compile, no checkpointing. Strict sdpa: only that kernel "
        "(an error where it cannot run).",
        _peak_note(results),
    ]
    return results, rows + [""] + notes


def mode_sampling(args) -> tuple[list[dict], list[str]]:
    results = []
    for size in args.sample_sizes:
        for sampler in args.samplers:
            case = {
                **_base(args, size),
                "kind": "sample",
                "sampler": sampler,
                "steps": args.steps,
                "label": sampler,
            }
            case["iters"], case["warmup"] = (1, 0) if args.quick else (3, 1)
            if not args.batch:
                case["batch"] = 2 if args.quick else (16 if _on_gpu() else 8)
            results.append(spawn(case))
    rows = [
        "| size | sampler | steps | model calls | batch | img/s | ms per call | peak mem (GB) |",
        "|" + " --- |" * 8,
    ]
    for r in results:
        c = r["case"]
        if "error" in r:
            rows.append(f"| {c['size']} | {c['sampler']} | {c['steps']} | | | {r['error']} | | |")
            continue
        rows.append(
            f"| {c['size']} | {c['sampler']} | {c['steps']} | {r['model_calls']} | {c['batch']} "
            f"| **{r['images_per_s']:.2f}** | {r['ms_per_call']:.1f} | {r['peak_mem_gb']:.2f} |"
        )
    notes = [
        "Random-weight UNet, classifier-free guidance (cond + uncond in one batched call, scale 5), "
        "scaled-linear schedule; latents only (no VAE decode). A model call evaluates 2 × batch."
    ]
    return results, rows + [""] + notes


def mode_diffusers(args) -> tuple[list[dict], list[str]]:
    from bench.diffusers_unet import compare

    results = []
    for size in args.diffusers_sizes:
        case = Case(**{k: v for k, v in _base(args, size).items() if k != "iters"})
        rounds, steps = (2, 1) if args.quick else (args.rounds, 3)
        results.append(compare(size, case, rounds, steps))
        print(f"  diffusers {size}: ours/diffusers speed {results[-1]['speed_ratio']:.3f}×", flush=True)
    rows = [
        "| size | params ours | params diffusers | batch | ours ms/step | diffusers ms/step | ours speed ÷ diffusers |",
        "|" + " --- |" * 7,
    ]
    for r in results:
        rows.append(
            f"| {r['size']} | {r['params_ours']:,} | {r['params_diffusers']:,} | {r['batch']} "
            f"| {r['ours_step_ms']:.1f} | {r['diffusers_step_ms']:.1f} | **{r['speed_ratio']:.3f}×** |"
        )
    notes = [
        f"Training step (forward, MSE, backward, AdamW), {results[0]['rounds'] if results else 0} interleaved rounds "
        f"(ABBA), median of per-round ratios; diffusers {results[0]['diffusers'] if results else '?'}."
    ]
    return results, rows + [""] + notes


def mode_loader(args) -> tuple[list[dict], list[str]]:
    out = args.json_dir / "loader.json"
    cmd = [sys.executable, str(ROOT / "bench" / "loader.py"), "--out", str(out)] + (
        ["--quick"] if args.quick else []
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    print(proc.stdout[-2000:], flush=True)
    if proc.returncode:
        return [{"error": proc.stderr[-500:]}], [f"bench/loader.py failed: {proc.stderr.strip()[-300:]}"]
    return [json.loads(out.read_text())], [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]


def mode_fsdp(args) -> tuple[list[dict], list[str]]:
    """Training state and peak memory per rank, DDP against strategy=fsdp's sharding (bench/fsdp_memory.py)."""
    from bench.fsdp_memory import run

    ranks = torch.cuda.device_count() if _on_gpu() else 2
    batch = args.batch or (1 if not _on_gpu() else 16)
    steps = 1 if args.quick else 3
    results = []
    for size in args.fsdp_sizes:
        for strategy in ("ddp", "fsdp"):
            results.append(run(size, strategy, ranks, batch, steps, bf16=_on_gpu()))
            r = results[-1]
            print(f"  {size} {strategy} ×{ranks}: {r['state_gb']:.2f} GB state per rank", flush=True)
    rows = [
        "| size | params (M) | strategy | ranks | batch | state per rank (GB) | vs DDP | peak per rank (GB) | step ms |",
        "|" + " --- |" * 9,
    ]
    ddp = {r["size"]: r for r in results if r["strategy"] == "ddp"}
    for r in results:
        ratio = r["state_gb"] / ddp[r["size"]]["state_gb"]
        rows.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f} | {r['strategy']} | {r['ranks']} | {r['batch']} "
            f"| {r['state_gb']:.2f} | **{ratio:.2f}×** | {r['peak_gb']:.2f} | {r['step_ms']:.0f} |"
        )
    notes = [
        "State: parameters, gradients, AdamW moments and the EMA copy held by rank 0, tensor by tensor (a shard counts "
        "its local part): 20 bytes per parameter under DDP. Peak: "
        + (results[0]["peak_source"] if results else "n/a")
        + ". Step: forward, backward, fused AdamW, EMA update; median of "
        + f"{steps} after one untimed step."
    ]
    return results, rows + [""] + notes


def _timed_ms(fn, device: torch.device, n: int) -> float:
    """Mean milliseconds of `fn()` over `n` calls, after one untimed call."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n * 1e3


def _ema_costs(size: str, device: torch.device, reps: int) -> dict:
    from bench.train_step import unet_kwargs
    from ldm.models import CrossAttentionUNet
    from ldm.training.ema import EMA, PowerEMA
    from ldm.training.posthoc_ema import save_snapshot, sigma_rel_to_gamma

    unet = CrossAttentionUNet(**unet_kwargs(size)).to(device)
    ema = EMA(unet)
    power = PowerEMA(unet, [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step-00000001.safetensors"
        snapshot_ms = _timed_ms(lambda: save_snapshot(power, path, 1), device, 1)
        snapshot_gb = path.stat().st_size / 1e9
    return {
        "size": size,
        "params": sum(p.numel() for p in unet.parameters()),
        "device": device.type,
        "ema_ms": _timed_ms(lambda: ema.update(unet), device, reps),
        "posthoc_ms": _timed_ms(lambda: power.update(unet), device, reps),
        "snapshot_ms": snapshot_ms,
        "snapshot_gb": snapshot_gb,
    }


def mode_ema(args) -> tuple[list[dict], list[str]]:
    """Per optimizer step: the EMA update and the post-hoc EMA's (two power-function averages); every N steps, a
    snapshot of them (float16 safetensors): time and bytes, nothing else running."""
    device = torch.device("cuda" if _on_gpu() else "cpu")
    reps = 2 if args.quick else 10
    results = []
    for size in args.ema_sizes:
        if _deadline is not None and time.monotonic() >= _deadline:
            results.append({"size": size, "error": NOT_RUN})
            continue
        results.append(_ema_costs(size, device, reps))
        r = results[-1]
        print(
            f"  {size}: EMA {r['ema_ms']:.1f} ms, post-hoc {r['posthoc_ms']:.1f} ms, snapshot "
            f"{r['snapshot_gb']:.2f} GB in {r['snapshot_ms']:.0f} ms",
            flush=True,
        )
    rows = [
        "| size | params (M) | EMA update (ms) | post-hoc EMA update, 2 averages (ms) | snapshot (GB) | snapshot write (s) |",
        "|" + " --- |" * 6,
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['size']} | {r['error']} | | | | |")
            continue
        rows.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f} | {r['ema_ms']:.1f} | {r['posthoc_ms']:.1f} "
            f"| {r['snapshot_gb']:.2f} | {r['snapshot_ms'] / 1e3:.1f} |"
        )
    notes = [
        f"Updates: mean of {reps} after one untimed, fp32 weights on the {device.type}. Snapshot: both averages as "
        "float16 safetensors on local disk (written, fsynced, renamed), copied to the host first on a GPU."
    ]
    return results, rows + [""] + notes


def _eval_costs(device: torch.device, batch: int, reps: int, n_prc: int, dinov2_size=(1024, 24)) -> dict:
    from eval.dinov2 import DINOv2Features, save_random_dinov2_weights
    from eval.features import InceptionFeatures, save_random_inception_weights
    from eval.fid import precision_recall

    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:  # the real architectures; timings do not depend on the weights
        inception = InceptionFeatures(save_random_inception_weights(Path(tmp) / "i.pth")).to(device)
        dinov2 = DINOv2Features(save_random_dinov2_weights(Path(tmp) / "d.pth", *dinov2_size)).to(device)
    result = {"device": device.type, "batch": batch, "prc_images": n_prc, "dinov2_size": list(dinov2_size)}
    for name, extractor in (("inception", inception), ("dinov2", dinov2)):
        result[f"{name}_ms_per_image"] = (
            _timed_ms(lambda e=extractor: e(images.to(device)), device, reps) / batch
        )
    generator = torch.Generator().manual_seed(0)
    for dim in (2048, 1024):
        gen, real = (torch.randn(n_prc, dim, generator=generator).to(device) for _ in range(2))
        result[f"prc_{dim}_s"] = _timed_ms(lambda g=gen, r=real: precision_recall(g, r), device, 1) / 1e3
    return result


def mode_eval(args) -> tuple[list[dict], list[str]]:
    """What the evaluation adds to sampling: feature extraction per image (Inception for FID/KID/IS, DINOv2
    ViT-L/14 for FD_DINOv2) and precision / recall over N generated and N reference features."""
    device = torch.device("cuda" if _on_gpu() else "cpu")
    batch, reps = (2, 1) if args.quick else (16 if device.type == "cpu" else 64, 3)
    n_prc = 500 if args.quick else 10000
    r = _eval_costs(device, batch, reps, n_prc, (384, 12) if args.quick else (1024, 24))  # quick: ViT-S
    print(
        f"  Inception {r['inception_ms_per_image']:.1f} ms/img, DINOv2 {r['dinov2_ms_per_image']:.1f} "
        f"ms/img, precision/recall {r['prc_2048_s']:.1f} s / {r['prc_1024_s']:.1f} s",
        flush=True,
    )
    rows = [
        f"| device | Inception-v3, 299 px (ms/image) | DINOv2 {'ViT-S/14' if args.quick else 'ViT-L/14'}, 224 px (ms/image) "
        f"| precision/recall, {n_prc:,} vs {n_prc:,}, 2048-d (s) | same, 1024-d (s) |",
        "|" + " --- |" * 5,
        f"| {device.type} | {r['inception_ms_per_image']:.1f} | {r['dinov2_ms_per_image']:.1f} "
        f"| {r['prc_2048_s']:.1f} | {r['prc_1024_s']:.1f} |",
    ]
    notes = [
        f"Features: 256-px uint8 images in batches of {batch}, resized by each protocol (torch-fidelity's TF1 "
        f"bilinear; bicubic with antialias), fp32, mean of {reps} batches after one untimed. Precision/recall: "
        "torch-fidelity's k = 3 (distances in blocks of 10k rows), once, on random features."
    ]
    return [r], rows + [""] + notes


MODES = {
    "train": ("UNet training step", mode_train),
    "fastpaths": ("Fast paths on/off", mode_fastpaths),
    "sampling": ("Sampling images/s per sampler", mode_sampling),
    "diffusers": ("Our UNet vs diffusers UNet2DConditionModel", mode_diffusers),
    "loader": ("Data-loader throughput", mode_loader),
    "fsdp": ("Training state per rank: DDP vs strategy=fsdp", mode_fsdp),
    "ema": ("EMA and post-hoc EMA cost per step", mode_ema),
    "eval": ("Evaluation cost: features per image, precision/recall", mode_eval),
}


# ---------------------------------------------------------------- output


def _precision(c: dict) -> str:
    return (
        "bf16 autocast" if c["bf16"] else ("fp32 (TF32)" if c["tf32"] and c["device"] == "cuda" else "fp32")
    )


def _mfu(r: dict) -> str:
    return f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"


def _peak_note(results: list[dict]) -> str:
    sources = sorted(
        {f"{r['peak_tflops']:.3g} TFLOP/s ({r['peak_source']})" for r in results if r.get("peak_tflops")}
    )
    return "MFU = model TFLOP/s (FlopCounterMode, fwd + bwd) ÷ peak: " + ("; ".join(sources) or "n/a") + "."


def _mem_note(results: list[dict]) -> str:
    return ", ".join(sorted({r["mem_source"] for r in results if "mem_source" in r})) or "n/a"


def machine() -> dict:
    device = torch.device("cuda" if _on_gpu() else "cpu")
    meta = {
        "device": device_name(device),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if _on_gpu() else None,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    try:  # "-dirty": tracked files differ from the commit, so the code measured is not exactly that commit's
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout  # noqa: E731
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
        meta["commit"] = git("rev-parse", "--short", "HEAD").strip() + ("-dirty" if dirty else "")
    except OSError:
        meta["commit"] = None
    try:
        import diffusers

        meta["diffusers"] = diffusers.__version__
    except ImportError:
        meta["diffusers"] = None
    return meta


def append_markdown(path: Path, title: str, meta: dict, command: str, lines: list[str]) -> None:
    where = meta["device"] + (
        f", {meta['cpu_cores']} cores" if meta["cuda"] is None else f", CUDA {meta['cuda']}"
    )
    head = (
        f"\n### {title} — {where}, torch {meta['torch']}, {meta['date']}, commit {meta['commit']}\n\n"
        f"`{command}`\n\n"
    )
    with open(path, "a") as f:
        f.write(head + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=[*MODES, "all", "lease"])
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds: start no case after this (a GPU lease); lease mode: SD2 train, fastpaths, sampling, ema in order",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny, 2 iterations, JSON to /tmp")
    parser.add_argument("--sizes", default=None, help="train: comma-separated sizes (tiny, mid, sd2)")
    parser.add_argument(
        "--fast-sizes", default=None, help="fastpaths: sizes (default: tiny on CPU, sd2 on GPU)"
    )
    parser.add_argument(
        "--sample-sizes", default=None, help="sampling: sizes (default: tiny on CPU, sd2 on GPU)"
    )
    parser.add_argument("--diffusers-sizes", default=None, help="diffusers: sizes (default: tiny,mid)")
    parser.add_argument("--fsdp-sizes", default=None, help="fsdp: sizes (default: mid on CPU, sd2 on GPU)")
    parser.add_argument(
        "--ema-sizes", default=None, help="ema: sizes (default: tiny,mid,sd2 on CPU, sd2 on GPU)"
    )
    parser.add_argument("--batch", type=int, default=None, help="override every size's default batch")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per case (default 10, quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, quick 1)")
    parser.add_argument("--rounds", type=int, default=6, help="diffusers: interleaved rounds")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument(
        "--steps", type=int, default=None, help="sampling: sampler steps (default 20, quick 2)"
    )
    parser.add_argument("--compile", action="store_true", help="fastpaths: include torch.compile on CPU too")
    parser.add_argument("--encode", action="store_true", help="fastpaths: include the VAE encoder on CPU too")
    parser.add_argument("--json-dir", default=None, help="default bench/results (quick: a temp dir)")
    parser.add_argument(
        "--markdown", default=None, help="append here (default docs/benchmarks.md; quick: none)"
    )
    args = parser.parse_args()

    gpu, quick, lease = _on_gpu(), args.quick, args.mode == "lease"
    if args.budget is not None:
        global _deadline
        _deadline = time.monotonic() + args.budget
    split = lambda s, d: (s or d).split(",")  # noqa: E731
    if lease:  # the figures a short GPU lease is for, the SD2-size UNet's first (docs/benchmarks.md)
        args.sizes = args.sizes or ("tiny" if quick else "sd2")
        args.samplers = "ddim,dpmpp_2m" if args.samplers == ",".join(SAMPLERS) else args.samplers
    args.sizes = split(args.sizes, "tiny" if quick else ("tiny,mid,sd2" if gpu else "tiny,mid"))
    args.fast_sizes = split(args.fast_sizes, "sd2" if gpu and not quick else "tiny")
    args.sample_sizes = split(args.sample_sizes, "sd2" if gpu and not quick else "tiny")
    args.diffusers_sizes = split(args.diffusers_sizes, "tiny" if quick else "tiny,mid")
    args.fsdp_sizes = split(args.fsdp_sizes, "tiny" if quick else ("sd2" if gpu else "mid"))
    args.ema_sizes = split(args.ema_sizes, "tiny" if quick else ("sd2" if gpu else "tiny,mid,sd2"))
    args.samplers = split(args.samplers, "")
    args.iters = args.iters or (2 if quick else (5 if lease else 10))
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else (2 if lease else 3))
    args.steps = args.steps or (2 if quick else 20)
    default_dir = Path(tempfile.gettempdir()) / "ldm-bench" if quick else ROOT / "bench" / "results"
    args.json_dir = Path(args.json_dir) if args.json_dir else default_dir
    args.json_dir.mkdir(parents=True, exist_ok=True)
    markdown = args.markdown if args.markdown is not None else ("" if quick else "docs/benchmarks.md")

    # on CPU, MFU is against this machine's measured matmul rate, measured once for all cases
    args.cpu_peak = {} if gpu else {dtype: cpu_matmul_tflops(dtype) for dtype in ("fp32", "bf16")}
    meta = {**machine(), "cpu_matmul_peak_tflops": args.cpu_peak or None}
    command = "python bench/run.py " + " ".join(sys.argv[1:])
    names = {"all": list(MODES), "lease": ["train", "fastpaths", "sampling", "ema"]}.get(
        args.mode, [args.mode]
    )
    for name in names:
        title, run = MODES[name]
        print(f"{name}:", flush=True)
        results, lines = run(args)
        if name != "loader":  # bench/loader.py writes its own JSON
            path = args.json_dir / f"{name}.json"
            path.write_text(json.dumps({"meta": meta, "command": command, "results": results}, indent=2))
        print("\n".join(lines) + "\n", flush=True)
        if markdown:
            append_markdown(ROOT / markdown, title, meta, command, lines)


if __name__ == "__main__":
    main()
