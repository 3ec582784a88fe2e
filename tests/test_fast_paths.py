"""The switchable fast paths (channels_last, SDPA kernel, TF32) and the MFU / GPU-memory panels: each switch is
applied in a real training run, and the SDPA switch changes the kernel PyTorch runs."""

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from ldm.utils.speed import batch_to_channels_last, compute_type, device_peak_tflops, sdpa_backend, set_tf32

from .helpers import FAST, compose_train

CHANNELS_LAST = torch.channels_last


def _attention_kernels(backend: str, **kwargs) -> set[str]:
    q = torch.randn(2, 4, 16, 8)
    with sdpa_backend(backend, **kwargs), profile() as prof:
        F.scaled_dot_product_attention(q, q, q)
    return {e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}


def test_sdpa_backend_selects_the_kernel_and_restores_the_flags():
    assert _attention_kernels("math") == {"aten::_scaled_dot_product_attention_math"}
    assert _attention_kernels("flash") == {"aten::_scaled_dot_product_flash_attention_for_cpu"}
    # the memory-efficient kernel is CUDA-only: on CPU the math fallback runs, or nothing in strict mode
    assert _attention_kernels("efficient") == {"aten::_scaled_dot_product_attention_math"}
    with pytest.raises(RuntimeError, match="No viable backend|No available kernel"):
        _attention_kernels("efficient", fallback=False)
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    with pytest.raises(ValueError, match="sdpa_backend"), sdpa_backend("fastest"):
        pass


def test_batch_to_channels_last_converts_only_image_tensors():
    batch = {
        "image": torch.randn(2, 3, 8, 8),
        "mask": torch.ones(2, 1, 8, 8, dtype=torch.bool),
        "t": torch.ones(2),
    }
    batch_to_channels_last(batch)
    assert batch["image"].is_contiguous(memory_format=CHANNELS_LAST) and batch["image"].stride(1) == 1
    assert batch["mask"].stride(1) == 64 and batch["t"].shape == (2,)  # bool and 1-D tensors untouched


def test_peak_table_and_compute_type():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert device_peak_tflops("NVIDIA H200", "tf32") == 494.5
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops("NVIDIA GeForce RTX 4090") is None
    assert compute_type("bf16-mixed") == "bf16" and compute_type("16-mixed") == "bf16"
    assert compute_type("32-true", tf32=True) == "tf32" and compute_type("32-true", tf32=False) == "fp32"


class _Observe(L.Callback):
    """Records, inside the training steps, the state the fast-path switches should have put in place."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        conv = pl_module.unet.input_blocks[0][0].weight  # (64, 4, 3, 3): only one layout is contiguous
        self.seen.append(
            {
                "weights_nhwc": conv.is_contiguous(memory_format=CHANNELS_LAST),
                "ema_nhwc": pl_module.ema.module.input_blocks[0][0].weight.is_contiguous(
                    memory_format=CHANNELS_LAST
                ),
                "batch_nhwc": batch["image"].is_contiguous(memory_format=CHANNELS_LAST),
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
                "matmul_precision": torch.get_float32_matmul_precision(),
            }
        )


@pytest.fixture(scope="module")
def switched_run(synthetic_shards, vae_ckpt, tmp_path_factory):
    """Two stage-2 steps with every switch away from its default, logged to an offline W&B run."""
    from ldm.training.run import train

    run_dir = tmp_path_factory.mktemp("switched")
    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={Path(synthetic_shards[0]).parent}",
        f"autoencoder_ckpt={vae_ckpt}",
        "trainer.max_steps=2",
        "logger=wandb",
        "sampler.num_steps=2",
        "callbacks.sample_grid.every_n_steps=0",  # one grid, at the end
        "callbacks.model_checkpoint=null",
        "channels_last=true",
        "sdpa_backend=math",
        "tf32=false",
        "peak_tflops=0.001",
        *FAST,
        run_dir=str(run_dir),
    )
    observe = _Observe()
    try:
        result = train(cfg, extra_callbacks=[observe])
        precision_after = torch.get_float32_matmul_precision()
    finally:
        set_tf32(True)
    return result, observe.seen, precision_after, run_dir


def test_switches_are_applied_in_training(switched_run):
    result, seen, precision_after, _ = switched_run
    assert precision_after == "highest"
    assert len(seen) == 2
    for step in seen:
        assert step == {
            "weights_nhwc": True,
            "ema_nhwc": True,
            "batch_nhwc": True,
            "flash": False,
            "math": True,
            "matmul_precision": "highest",
        }
    assert torch.backends.cuda.flash_sdp_enabled()  # the kernel choice ends with the run
    # the checkpoint keeps the layout and the keys
    state = torch.load(result["checkpoint"], weights_only=True)["state_dict"]
    assert state["unet.input_blocks.0.0.weight"].is_contiguous(memory_format=CHANNELS_LAST)


def test_dashboard_panels_in_the_offline_wandb_run(switched_run):
    """The issue's panel list, read back from the run's .wandb record log (scripts/plot_run.py's reader)."""
    from scripts.plot_run import read_wandb_history, wandb_records

    *_, run_dir = switched_run
    (run,) = (Path(run_dir) / "wandb").glob("offline-run-*")
    rows = read_wandb_history(run)
    keys = set().union(*rows)
    bins = {k for k in keys if k.startswith("train_loss_by_t/")}
    assert bins and all(len(k.split("/")[1]) == 9 for k in bins)  # e.g. 0300-0399
    expected = {"train/loss", "train/grad_norm", "lr-AdamW/pg1", "perf/images_per_sec", "perf/samples_seen"}
    expected |= {"perf/data_wait_frac", "perf/tflops_per_device", "perf/mfu", "perf/step_time"}
    assert expected <= keys and "perf/gpu_mem_gb" not in keys  # no GPU memory panel on CPU
    perf = [r for r in rows if "perf/mfu" in r]
    assert [r["perf/samples_seen"] for r in perf] == [8.0, 16.0]
    for r in perf:  # MFU = TFLOP/s ÷ the configured peak
        assert r["perf/mfu"] == pytest.approx(r["perf/tflops_per_device"] / 0.001, rel=1e-5)

    records = list(wandb_records(next(run.glob("*.wandb"))))
    captions = [
        json.loads(item.value_json)
        for rec in records
        if rec.WhichOneof("record_type") == "history"
        for item in rec.history.item
        if (item.key or "/".join(item.nested_key)) == "samples/grid/captions"
    ]
    assert len(captions) == 1 and len(captions[0]) == 1  # one grid, logged as a captioned W&B image
    caption = captions[0][0]
    assert (
        caption.startswith("step 2, DDIMSampler, 2 steps") and "a red circle on a blue background" in caption
    )
    assert list(run.glob("files/media/images/samples/grid_*.png"))
    config = next(rec.config for rec in records if rec.WhichOneof("record_type") == "config")
    logged = {item.key for item in config.update}
    assert {"unet", "diffusion", "optim", "sdpa_backend", "derived"} <= logged  # the resolved config


def test_compile_switch_compiles_the_unet_and_the_encoder_of_raw_images(synthetic_shards, vae_ckpt, tmp_path):
    """compile=true: the trained UNet and, on raw images, the frozen encoder (not the decoder) are wrapped by
    torch.compile in place; state-dict keys stay those of the plain modules. (Compiling itself happens on the
    first call, minutes on CPU: not run here.)"""
    from ldm.training import run

    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={Path(synthetic_shards[0]).parent}",
        f"autoencoder_ckpt={vae_ckpt}",
        "compile=true",
        run_dir=str(tmp_path),
    )
    run._adopt_autoencoder_config(cfg)
    module = run.build_module(cfg)
    keys = list(module.state_dict())
    run._compile(cfg, module)
    ae = module.codec.autoencoder
    assert module.unet._compiled_call_impl is not None and ae.encoder._compiled_call_impl is not None
    assert ae.decoder._compiled_call_impl is None and module.text_encoder._compiled_call_impl is None
    assert list(module.state_dict()) == keys


def test_compile_under_fsdp_compiles_each_block_with_room_for_every_bucket(
    synthetic_shards, vae_ckpt, tmp_path
):
    """strategy=fsdp compile=true: each UNet block is compiled on its own, not the UNet, and dynamo's graph limits
    grow with the number of aspect-ratio buckets (tests/test_fsdp.py shows why the default of 8 is too few)."""
    import torch._dynamo

    from ldm.data.buckets import make_buckets
    from ldm.training import run
    from ldm.training.fsdp import UNetFSDPStrategy

    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={Path(synthetic_shards[0]).parent}",
        f"autoencoder_ckpt={vae_ckpt}",
        "compile=true",
        "strategy=fsdp",
        "data.resolution=64",
        "data.buckets={step: 8, max_ratio: 4.0}",
        run_dir=str(tmp_path),
    )
    run._adopt_autoencoder_config(cfg)
    module = run.build_module(cfg)
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):  # restored after
        run._compile(cfg, module, UNetFSDPStrategy())
        limits = torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit
    blocks = module.unet.blocks()
    assert module.unet._compiled_call_impl is None
    assert all(block._compiled_call_impl is not None for block in blocks)
    sizes = len(make_buckets(64, 8, 4.0))
    assert sizes > 8 and min(limits) >= len(blocks) * sizes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_and_mfu_panels(synthetic_shards, vae_ckpt, tmp_path):
    from ldm.training.run import train

    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={Path(synthetic_shards[0]).parent}",
        f"autoencoder_ckpt={vae_ckpt}",
        "trainer.max_steps=2",
        "logger=csv",
        "callbacks.sample_grid=null",
        "callbacks.model_checkpoint=null",
        "channels_last=true",
        *FAST,
        run_dir=str(tmp_path),
    )
    train(cfg)
    (metrics_file,) = tmp_path.glob("**/metrics.csv")
    rows = [r for r in csv.DictReader(metrics_file.open()) if r.get("perf/gpu_mem_gb")]
    assert rows and all(0 < float(r["perf/gpu_mem_gb"]) <= float(r["perf/gpu_mem_reserved_gb"]) for r in rows)
    if device_peak_tflops(torch.cuda.get_device_name()) is not None:
        assert all(0 < float(r["perf/mfu"]) < 1 for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_compiled_with_bf16_weights_trains_on_a_gpu(synthetic_shards, vae_ckpt, tmp_path):
    """The GPU-only combination no CPU test reaches: FSDP2 over NCCL, bf16 gathered weights, per-block
    torch.compile (inductor's Triton kernels), bf16-mixed with fused AdamW and clipping; one checkpoint file."""
    from ldm.training.run import train

    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={Path(synthetic_shards[0]).parent}",
        f"autoencoder_ckpt={vae_ckpt}",
        "strategy=fsdp",
        "strategy.param_dtype=bf16",
        "compile=true",
        "trainer.max_steps=3",
        "logger=csv",
        "callbacks.sample_grid=null",
        *FAST,
        run_dir=str(tmp_path),
    )
    result = train(cfg)
    (metrics_file,) = tmp_path.glob("**/metrics.csv")
    losses = [float(r["train/loss"]) for r in csv.DictReader(metrics_file.open()) if r.get("train/loss")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    checkpoint = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    unet = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("unet.")}
    assert unet and all(v.dtype == torch.float32 and v.device.type == "cpu" for v in unet.values())
