"""What perf/tflops_per_device and perf/mfu measure: model FLOPs (gradient checkpointing's recomputation left out,
as MFU is defined: Chowdhery et al. 2022, app. B) against the right row of the device-peak table."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

import ldm.utils.speed as speed
from ldm.models import CrossAttentionUNet
from ldm.models.unet import EmbedSequential
from ldm.training.throughput import ThroughputCallback
from ldm.utils.speed import PEAK_TFLOPS, device_peak_tflops

from .test_models import TINY_UNET, perturb_zero_params

# what torch.cuda.get_device_name() returns on each GPU of the table → the row it must get
DEVICE_NAMES = {
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H100 80GB HBM3": "H100",
    "NVIDIA H200": "H200",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA A100-SXM4-80GB": "A100",
    "NVIDIA A100 80GB PCIe": "A100",
}


def test_every_peak_row_is_reached_by_its_own_device_name(monkeypatch):
    """No row is shadowed by a shorter key that is a substring of its name (H200 in "H200 NVL", in "GH200")."""
    # a value unique to each row, so that rows with the same peaks (H100 SXM, H200, GH200) still tell apart
    rows = {key: {c: float(i) for c in ("bf16", "tf32", "fp32")} for i, key in enumerate(PEAK_TFLOPS)}
    monkeypatch.setattr(speed, "PEAK_TFLOPS", rows)
    for key in rows:
        assert device_peak_tflops(f"NVIDIA {key}") == rows[key]["bf16"], key
    for name, key in DEVICE_NAMES.items():
        for compute in ("bf16", "tf32", "fp32"):
            assert device_peak_tflops(name, compute) == rows[key][compute], (name, compute)
    assert set(DEVICE_NAMES.values()) == set(PEAK_TFLOPS)  # every row has a real device name to check


def test_h200_nvl_gets_its_data_sheet_peaks():
    # NVIDIA's H200 NVL data sheet lists tensor-core rates with 2:4 sparsity (bf16 1,671, tf32 835 TFLOPS): dense is
    # half; fp32 (no sparsity) 60
    assert device_peak_tflops("NVIDIA H200 NVL", "bf16") == 1671 / 2
    assert device_peak_tflops("NVIDIA H200 NVL", "tf32") == 835 / 2
    assert device_peak_tflops("NVIDIA H200 NVL", "fp32") == 60.0
    assert device_peak_tflops("NVIDIA H200", "bf16") == 989.0  # the SXM part keeps its own row


# ---------------------------------------------------------------- model vs hardware FLOPs


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "key": ["a", "b"],
        "latent_mean": torch.randn(2, 4, 16, 16, generator=g),
        "t": torch.tensor([10, 900]),
        "context": torch.randn(2, 7, TINY_UNET["context_dim"], generator=g),
    }


def _unet(checkpointing: bool = False) -> CrossAttentionUNet:
    torch.manual_seed(0)
    unet = CrossAttentionUNet(**TINY_UNET, gradient_checkpointing=checkpointing)
    perturb_zero_params(unet)
    return unet.train()


class _UNetStep(L.LightningModule):
    """A tiny UNet's training step on a fixed batch; keeps what the callbacks log."""

    def __init__(self, checkpointing: bool) -> None:
        super().__init__()
        self.unet = _unet(checkpointing)
        self.logged: list[dict] = []

    def training_step(self, batch, batch_idx):
        return self.unet(batch["latent_mean"], batch["t"], batch["context"]).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)

    def log_dict(self, metrics, *args, **kwargs) -> None:
        self.logged.append(dict(metrics))


def _fit(tmp_path, checkpointing: bool, early_stop: bool = True) -> tuple[ThroughputCallback, dict]:
    module, callback = _UNetStep(checkpointing), ThroughputCallback(peak_tflops=2.0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        log_every_n_steps=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with set_checkpoint_early_stop(early_stop):
        trainer.fit(module, train_dataloaders=DataLoader([_batch()], batch_size=None))
    (metrics,) = module.logged
    return callback, metrics


@pytest.fixture(scope="module")
def reference_flops() -> tuple[int, int]:
    """Counted without the callback, Lightning or checkpointing: FLOPs of the UNet's forward + backward, and of
    the forward of the layers `gradient_checkpointing` wraps (ResnetBlock and SpatialTransformer in the blocks)."""
    unet, batch = _unet(), _batch()
    # FlopCounter for its CPU attention formula (test_cpu_attention_is_counted_...); nothing is recomputed here
    with speed.FlopCounter() as forward:
        loss = unet(batch["latent_mean"], batch["t"], batch["context"]).square().mean()
    with speed.FlopCounter() as backward:
        loss.backward()
    assert forward.recompute_flops == backward.recompute_flops == 0
    counts = forward.get_flop_counts()
    wrapped = [
        f"CrossAttentionUNet.{name}.{i}"
        for name, block in unet.named_modules()
        if isinstance(block, EmbedSequential)
        for i, layer in enumerate(block)
        if type(layer).__name__ in ("ResnetBlock", "SpatialTransformer")
    ]
    assert len(wrapped) == 15  # as in test_unet_gradient_checkpointing_same_gradients
    layers = sum(sum(counts[name].values()) for name in wrapped)
    assert 0 < layers < forward.get_total_flops()
    return forward.get_total_flops() + backward.get_total_flops(), layers


def _logged_flops(metrics: dict, name: str) -> float:
    return metrics[name] * metrics["perf/step_time"] * 1e12


def test_checkpointing_leaves_model_flops_and_mfu_unchanged(tmp_path, reference_flops):
    step, layers = reference_flops
    plain, plain_metrics = _fit(tmp_path / "plain", checkpointing=False)
    full, full_metrics = _fit(tmp_path / "full", checkpointing=True, early_stop=False)
    early, early_metrics = _fit(tmp_path / "early", checkpointing=True)
    # model FLOPs: forward + backward (AdamW's element-wise ops count nothing), whether or not activations are
    # recomputed
    assert plain.flops_per_batch == full.flops_per_batch == early.flops_per_batch == step
    for metrics in (plain_metrics, full_metrics, early_metrics):
        assert _logged_flops(metrics, "perf/tflops_per_device") == pytest.approx(step, rel=1e-9)
        assert metrics["perf/mfu"] == pytest.approx(metrics["perf/tflops_per_device"] / 2.0, rel=1e-12)

    # hardware FLOPs: without checkpointing the same; with it, plus the recomputed forward of the wrapped layers:
    # all of it without early stop, less with it (recomputation stops once the last tensor backward needs is back)
    assert plain.hw_flops_per_batch == step and "perf/hw_tflops_per_device" not in plain_metrics
    assert full.hw_flops_per_batch == step + layers
    assert step < early.hw_flops_per_batch < step + layers
    for cb, metrics in ((full, full_metrics), (early, early_metrics)):
        assert _logged_flops(metrics, "perf/hw_tflops_per_device") == pytest.approx(
            cb.hw_flops_per_batch, rel=1e-9
        )
        assert metrics["perf/hfu"] == pytest.approx(metrics["perf/hw_tflops_per_device"] / 2.0, rel=1e-12)


def test_resume_keeps_both_counts():
    counted = ThroughputCallback()
    counted.flops_per_batch, counted.hw_flops_per_batch, counted.flops_numel = 3.0e9, 4.0e9, 2048
    resumed = ThroughputCallback()
    resumed.load_state_dict(counted.state_dict())
    assert (resumed.flops_per_batch, resumed.hw_flops_per_batch, resumed.flops_numel) == (3.0e9, 4.0e9, 2048)
    older = ThroughputCallback()  # a checkpoint from before the hardware count: one count for both
    older.load_state_dict({"samples_seen": 8, "flops_per_batch": 3.0e9, "flops_numel": 2048})
    assert older.flops_per_batch == older.hw_flops_per_batch == 3.0e9


def test_cpu_attention_is_counted_as_the_math_path_and_the_cuda_kernels_are():
    """PyTorch's default CPU attention kernel had no FLOP formula (counted 0). Forward: the two matmuls the math path
    runs (QK^T, PV); backward: torch's formula for the fused CUDA kernels, five matmuls of the same size."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, s, d = 2, 4, 64, 16
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    one_matmul = 2 * b * h * s * s * d
    with FlopCounterMode(display=False) as math_path, sdpa_kernel([SDPBackend.MATH]):
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with speed.FlopCounter() as forward:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with speed.FlopCounter() as backward:
        out.sum().backward()
    assert math_path.get_total_flops() == forward.get_total_flops() == 2 * one_matmul
    assert backward.get_total_flops() == 5 * one_matmul
