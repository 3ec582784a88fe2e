"""Speed switches and device peaks, torch only (the training callbacks and bench/ share them): TF32, the SDPA
attention kernel, channels_last, the peak TFLOP/s MFU is measured against, and a FLOP counter that tells model
FLOPs from the hardware's (activation-checkpoint recomputation)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def set_tf32(enabled: bool) -> None:
    """TF32 tensor-core matmuls and convolutions in fp32 code (Ampere and later; no effect on CPU)."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def sdpa_backend(name: str, fallback: bool = True) -> Iterator[None]:
    """`F.scaled_dot_product_attention` restricted to one kernel: auto (PyTorch chooses) | flash | efficient |
    cudnn | math. With `fallback`, math stays enabled for the calls the chosen kernel cannot take (flash on fp32
    inputs, e.g. sample grids drawn outside autocast); the dispatcher tries math last, so it is used only then.
    Without, such a call fails ("No viable backend"): the benchmark's strict mode."""
    if name == "auto":
        yield
        return
    if name not in SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend must be auto or one of {', '.join(SDPA_BACKENDS)}, got {name!r}")
    backends = [SDPA_BACKENDS[name]] + ([SDPBackend.MATH] if fallback and name != "math" else [])
    with sdpa_kernel(backends):
        yield


def to_channels_last(module: nn.Module) -> nn.Module:
    """4-D parameters and buffers (convolution kernels) in NHWC layout, in place: cuDNN's tensor-core convolutions
    run NHWC, so NCHW weights cost a transpose per convolution under bf16. State-dict keys and values unchanged."""
    return module.to(memory_format=torch.channels_last)


def batch_to_channels_last(batch: dict) -> dict:
    """The batch's 4-D floating-point tensors (images, latents) in NHWC layout, in place in the dict."""
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim == 4 and value.is_floating_point():
            batch[key] = value.contiguous(memory_format=torch.channels_last)
    return batch


# Dense (no sparsity) peak TFLOP/s per GPU from the vendor's data sheets, by compute type (the sheets' tensor-core
# rates are with 2:4 sparsity: half of those). Names are matched as substrings of torch.cuda.get_device_name(), the
# longest matching key winning: "H200" is also a substring of "NVIDIA H200 NVL" and "NVIDIA GH200 480GB".
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H100": {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0},  # SXM
    "H200 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0},  # SXM
    "GH200": {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def compute_type(precision: str | int | None, tf32: bool | None = None) -> str:
    """The tensor-core rate a run's matmuls get: bf16 (also fp16) under 16-bit precision, else tf32 when fp32
    matmuls may use it (`torch.get_float32_matmul_precision() != "highest"`), else fp32."""
    if "16" in str(precision):
        return "bf16"
    if tf32 is None:
        tf32 = torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "fp32"


def device_peak_tflops(device_name: str, compute: str = "bf16") -> float | None:
    """Peak TFLOP/s of a GPU named `device_name` for `compute` (bf16 | tf32 | fp32); None when not in the table."""
    keys = [key for key in PEAK_TFLOPS if key.lower() in device_name.lower()]
    return PEAK_TFLOPS[max(keys, key=len)][compute] if keys else None


class FlopCounter(FlopCounterMode):
    """FlopCounterMode that also tallies apart the FLOPs of activation-checkpoint recomputation, in the checkpoints
    taken with `**recompute_tally()`: MFU counts model FLOPs, without rematerialisation (Chowdhery et al. 2022,
    app. B), while `get_total_flops()` is what the hardware ran, recomputation included."""

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
        self.recompute_flops = 0

    def __enter__(self) -> FlopCounter:
        self.recompute_flops = 0
        counter = super().__enter__()
        _RECOMPUTE_COUNTERS.append(self)
        return counter

    def __exit__(self, *args) -> None:
        _RECOMPUTE_COUNTERS.remove(self)
        return super().__exit__(*args)

    def model_flops(self) -> int:
        return self.get_total_flops() - self.recompute_flops


# PyTorch's default CPU attention kernel has no FLOP formula in torch.utils.flop_counter (torch 2.14): it counted 0.
# Counted as the CUDA kernels are: QK^T and PV forward; five in backward (the scores are recomputed).
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v)
    ),
}

# the FlopCounters counting now: a module global, not thread-local, since backward may run on another thread
_RECOMPUTE_COUNTERS: list[FlopCounter] = []


@contextlib.contextmanager
def _tally_recompute(counters: list[FlopCounter]) -> Iterator[None]:
    """Around one checkpoint's recomputation: what each counter counted in it, added to its recompute_flops."""
    before = [counter.get_total_flops() for counter in counters]
    try:
        yield
    finally:
        for counter, flops in zip(counters, before, strict=True):
            counter.recompute_flops += counter.get_total_flops() - flops


def recompute_tally() -> dict[str, Callable[[], tuple[AbstractContextManager, AbstractContextManager]]]:
    """Keyword arguments for a non-reentrant torch.utils.checkpoint: while a FlopCounter counts, a `context_fn`
    that tallies the recomputation for it; else none (dynamo cannot trace a checkpoint given any `context_fn`
    but a literal one, while a FlopCounterMode keeps dynamo from compiling, so the counted step runs eagerly)."""
    if not _RECOMPUTE_COUNTERS:
        return {}
    counters = list(_RECOMPUTE_COUNTERS)
    return {"context_fn": lambda: (contextlib.nullcontext(), _tally_recompute(counters))}
