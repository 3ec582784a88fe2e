"""Speed switches and device peaks, torch only (the training callbacks and bench/ share them): TF32, the SDPA
attention kernel, channels_last, and the peak TFLOP/s MFU is measured against."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

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


# Dense (no sparsity) peak TFLOP/s per GPU from the vendor's data sheets, by compute type. Names are matched as
# substrings of torch.cuda.get_device_name(), most specific first.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H100": {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0},  # SXM
    "H200": {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0},
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
    for key, peaks in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return peaks[compute]
    return None
