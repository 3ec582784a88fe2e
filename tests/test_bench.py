"""The benchmark suite (bench/): FLOP counts against an independent count, one real case end to end, the diffusers
twin's architecture, the entry point's JSON and markdown, and the dashboard plot."""

import json
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.train_step import SIZES, Case, count_flops, make_inputs, run_case, unet_kwargs
from ldm.models import CrossAttentionUNet
from ldm.models.attention import CrossAttention

from .helpers import ROOT


def _flops_by_hooks(model: nn.Module, inputs) -> float:
    """Forward FLOPs from the layer shapes: 2·MACs of every convolution and linear layer, and 2 × 2·B·H·N·L·D for
    the two matmuls (QKᵀ, AV) of each attention."""
    total = [0.0]

    def conv(m, args, out):
        total[0] += 2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, args, out):
        total[0] += 2 * out.numel() * m.in_features

    def attention(m, args, kwargs, out):
        x = args[0]
        context = args[1] if len(args) > 1 and args[1] is not None else kwargs.get("context", x)
        b, n, _ = x.shape
        inner = m.to_q.out_features  # heads × head dim
        total[0] += 2 * 2 * b * n * context.shape[1] * inner

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear))
        elif isinstance(module, CrossAttention):
            hooks.append(module.register_forward_hook(attention, with_kwargs=True))
    with torch.no_grad():
        model(*inputs)
    for h in hooks:
        h.remove()
    return total[0]


def test_flop_count_matches_the_layer_shapes_and_scales_with_batch():
    x, t, context, _ = make_inputs("tiny", 2, torch.device("cpu"))
    unet = CrossAttentionUNet(**unet_kwargs("tiny"))
    fwd, bwd = count_flops("tiny", 2)
    assert fwd == pytest.approx(_flops_by_hooks(unet, (x, t, context)), rel=1e-9)
    # backward: input and weight gradients (2× forward), less the first convolution's unneeded input gradient
    assert 1.8 * fwd < bwd <= 2.0 * fwd
    assert count_flops("tiny", 4) == pytest.approx((2 * fwd, 2 * bwd), rel=1e-9)


def test_one_training_case_end_to_end():
    result = run_case(Case(size="tiny", batch=2, iters=2, warmup=1))
    assert "error" not in result
    c = result["case"]
    assert (c["device"], c["bf16"], c["fused_adamw"]) == ("cpu", False, True)  # CPU defaults
    assert result["params_M"] == pytest.approx(4.283012)
    assert result["images_per_s"] == pytest.approx(2 / (result["step_ms"] / 1e3))
    # on CPU the step is synchronous: the whole step is the sum of its timed parts (medians: up to rounding)
    assert result["fwd_ms"] > 0 and result["bwd_ms"] > 0 and result["opt_ms"] > 0
    flops = (result["gflop_fwd"] + result["gflop_bwd"]) * 1e9
    assert result["tflops"] == pytest.approx(flops / (result["step_ms"] / 1e3) / 1e12)
    assert result["mfu"] == pytest.approx(result["tflops"] / result["peak_tflops"])
    assert "matmul" in result["peak_source"] and result["peak_mem_gb"] >= 0


def test_a_kernel_that_cannot_run_is_reported_not_raised():
    result = run_case(Case(size="tiny", batch=1, iters=1, warmup=0, sdpa="efficient"))  # CUDA-only kernel
    assert result["error"].startswith("No viable backend")


@pytest.mark.parametrize("size", ["tiny", "mid", "sd2"])
def test_diffusers_twin_has_our_architecture(size):
    from bench.diffusers_unet import diffusers_twin

    kwargs = unet_kwargs(size)
    with torch.device("meta"):
        ours, theirs = CrossAttentionUNet(**kwargs), diffusers_twin(kwargs)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    if size == "sd2":
        assert count(ours) == 865_910_724  # SD2-base, as published
    shapes = lambda m: sorted(tuple(p.shape) for p in m.parameters())  # noqa: E731
    assert shapes(ours) == shapes(theirs)


@pytest.mark.parametrize("size", ["tiny", "mid"])
def test_diffusers_twin_does_our_flops_with_our_heads(size):
    """Same FLOPs forward and backward (attention included: on the meta device both models' SDPA counts as its two
    matmuls) and the same head count in every attention, so the speed ratio compares like with like."""
    from diffusers.models.attention_processor import Attention

    from bench.diffusers_unet import _theirs_fn, diffusers_twin

    kwargs = unet_kwargs(size)
    with torch.device("meta"):
        ours, theirs = CrossAttentionUNet(**kwargs), diffusers_twin(kwargs)
    x, t, context, target = (v.to("meta") for v in make_inputs(size, 2, torch.device("cpu")))

    def flops(model) -> tuple[int, int]:
        with FlopCounterMode(display=False) as fwd:
            loss = F.mse_loss(model(x, t, context), target)
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
        return fwd.get_total_flops(), bwd.get_total_flops()

    assert flops(_theirs_fn(theirs)) == flops(ours) == count_flops(size, 2)
    heads = lambda m, kind: sorted(a.heads for a in m.modules() if isinstance(a, kind))  # noqa: E731
    assert heads(ours, CrossAttention) == heads(theirs, Attention) != []


def test_diffusers_comparison_interleaves_and_reports_a_ratio():
    from bench.diffusers_unet import compare

    result = compare("tiny", Case(size="tiny", batch=2, warmup=1), rounds=2, steps=1)
    assert result["params_ours"] == result["params_diffusers"] == 4_283_012
    assert len(result["ratios"]) == 2 and all(r > 0 for r in result["ratios"])
    assert result["speed_ratio"] == pytest.approx(
        sorted(result["ratios"])[0] / 2 + sorted(result["ratios"])[1] / 2
    )


def test_diffusers_comparison_runs_with_no_warmup():
    """--warmup 0 (`bench/run.py diffusers --warmup 0`) times the rounds only; it used to divide by zero."""
    from bench.diffusers_unet import compare

    result = compare("tiny", Case(size="tiny", batch=1, warmup=0), rounds=1, steps=1)
    assert len(result["ratios"]) == 1 and result["speed_ratio"] > 0


def test_peak_memory_is_the_training_steps_not_what_runs_after_them(monkeypatch):
    """The peak is read right after the timed steps: neither the FLOP count nor a CPU peak measured afterwards (a
    case started without run.py's cpu_peak, as `python bench/train_step.py '{...}'`) may add to it."""
    import bench.train_step as train_step

    def matmul_peak(dtype="fp32", n=2048):  # stands in for the 2048³ matmuls: 512 MiB written after the steps
        torch.ones(2**27).sum()
        return 1.0

    monkeypatch.setattr(train_step, "cpu_matmul_tflops", matmul_peak)
    result = run_case(Case(size="tiny", batch=1, iters=1, warmup=0))
    assert result["peak_tflops"] == 1.0 and "error" not in result
    assert result["peak_mem_gb"] < 0.25


def test_machine_says_when_the_tree_is_not_the_commit():
    """The markdown's and the JSON's commit: with uncommitted changes to tracked files, the code measured is not
    that commit's, and the record says so (`-dirty`)."""
    from bench.run import machine

    status = ["git", "status", "--porcelain", "--untracked-files=no"]
    dirty = bool(subprocess.run(status, cwd=ROOT, capture_output=True, text=True).stdout.strip())
    assert machine()["commit"].endswith("-dirty") == dirty


@pytest.mark.slow
def test_entry_point_writes_json_and_a_markdown_table(tmp_path):
    md = tmp_path / "bench.md"
    md.write_text("# Benchmarks\n")
    cmd = [
        sys.executable,
        "bench/run.py",
        "train",
        "--quick",
        "--batch",
        "2",
        "--iters",
        "1",
        "--warmup",
        "0",
    ]
    cmd += ["--json-dir", str(tmp_path), "--markdown", str(md)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "train.json").read_text())
    (result,) = data["results"]
    assert result["case"]["size"] == "tiny" and result["case"]["batch"] == 2 and result["images_per_s"] > 0
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["cpu_matmul_peak_tflops"]["fp32"] > 0
    text = md.read_text()
    assert text.startswith("# Benchmarks\n") and "### UNet training step" in text
    assert "`python bench/run.py train --quick" in text
    row = next(line for line in text.splitlines() if line.startswith("| tiny |"))
    assert f"**{result['images_per_s']:.2f}**" in row and row.count("|") == 15


def test_budget_caps_each_case_and_starts_none_past_it(monkeypatch):
    import bench.run as bench_run

    timeouts = []

    def time_out(cmd, timeout, **kwargs):  # stands in for the case's process: records the limit it was given
        timeouts.append(timeout)
        raise subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(bench_run.subprocess, "run", time_out)
    monkeypatch.setattr(bench_run, "_deadline", time.monotonic() + 100)
    assert "timed out after" in bench_run.spawn({"size": "tiny"})["error"]
    assert len(timeouts) == 1 and 90 < timeouts[0] <= 100  # the time left, not the 3600 s default
    monkeypatch.setattr(bench_run, "_deadline", time.monotonic() + 10)
    assert bench_run.spawn({"size": "tiny"})["error"] == bench_run.NOT_RUN and len(timeouts) == 1
    # under a budget the open question on a GPU comes first: compile, right after the defaults
    labels = [label for label, _ in bench_run.fast_path_variants(gpu=False, with_compile=True)]
    assert labels[:3] == ["defaults", "torch.compile", "compile + channels_last"]


def test_lease_mode_writes_its_four_tables_even_with_no_time_left(tmp_path):
    """A lease killed by its budget still leaves JSON and markdown for what it ran, and says what it did not run."""
    md = tmp_path / "lease.md"
    cmd = [sys.executable, "bench/run.py", "lease", "--quick", "--budget", "0"]
    cmd += ["--json-dir", str(tmp_path), "--markdown", str(md)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for mode in ("train", "fastpaths", "sampling", "ema"):
        results = json.loads((tmp_path / f"{mode}.json").read_text())["results"]
        assert results and all(r["error"] == "not run: --budget spent" for r in results), mode
    samplers = json.loads((tmp_path / "sampling.json").read_text())["results"]
    assert [r["case"]["sampler"] for r in samplers] == ["ddim", "dpmpp_2m"]
    from bench.run import fast_path_variants

    # one train case, the CPU fast paths, the samplers
    cases = 1 + len(fast_path_variants(gpu=False, with_compile=False)) + len(samplers) + 1  # + the EMA's size
    text = md.read_text()
    assert text.count("### ") == 4 and text.count("not run: --budget spent") == cases


def test_gpu_plan_finds_the_largest_batch_first_and_compiles_at_it(monkeypatch):
    """The GPU fast-path plan's control flow, against a stand-in for the case processes (no GPU here): a card where
    batch 256 fits (1024 with checkpointing) and compile doubles the speed."""
    from dataclasses import asdict

    import bench.run as bench_run

    probes = []  # (batch, grad_ckpt) of each unlabelled case: the largest-batch search's tries

    def case_process(case: dict, timeout: float = 3600) -> dict:
        case = asdict(Case(**{**case, "device": "cuda"}).resolve())
        if not case["label"]:
            probes.append((case["batch"], case["grad_ckpt"]))
        if case["batch"] > (1024 if case["grad_ckpt"] else 256):
            return {"case": case, "error": "out of memory"}
        speed = case["batch"] * (2.0 if case["compile"] else 1.0)
        return {
            "case": case,
            "images_per_s": speed,
            "tflops": 1.0,
            "mfu": 0.5,
            "peak_mem_gb": case["batch"] / 64,
        }

    monkeypatch.setattr(bench_run, "spawn", case_process)
    monkeypatch.setattr(bench_run, "_on_gpu", lambda: True)
    results, rows = bench_run.mode_fastpaths(_lease_args())
    ran = [(r["case"]["label"], r["case"]["batch"]) for r in results if r["case"]["kind"] == "train"]
    assert ran[:4] == [
        ("defaults", 64),
        ("largest batch", 256),
        ("torch.compile", 64),
        ("compile + channels_last", 64),
    ]
    assert ran[-2:] == [
        ("largest batch + torch.compile", 256),
        ("largest batch + gradient checkpointing", 1024),
    ]
    # each probe is a process that builds the model and steps it: the search with checkpointing starts above the
    # largest batch that fits without (which fits with it too), not again from batch 64
    assert probes == [(128, False), (256, False), (512, False), (512, True), (1024, True), (2048, True)]
    best = next(r for r in results if r["case"]["label"] == "largest batch + torch.compile")
    assert best["case"]["compile"] and not best["case"]["grad_ckpt"]
    assert "| sd2 | largest batch + torch.compile | 256 | 512.00 | **8.00×** |" in "\n".join(rows)


def test_gpu_plan_does_not_time_the_defaults_twice_when_no_larger_batch_fits(monkeypatch):
    """A card where only the default batch (64) fits: the defaults row is the largest batch, reused, not timed again
    in a process of its own, and compile at the largest batch is the torch.compile row already there."""
    from dataclasses import asdict

    import bench.run as bench_run

    spawned = []

    def case_process(case: dict, timeout: float = 3600) -> dict:
        case = asdict(Case(**{**case, "device": "cuda"}).resolve())
        spawned.append((case["label"], case["batch"]))
        if case["batch"] > (128 if case["grad_ckpt"] else 64):
            return {"case": case, "error": "out of memory"}
        speed = case["batch"] * (2.0 if case["compile"] else 1.0)
        return {"case": case, "images_per_s": speed, "tflops": 1.0, "mfu": 0.5, "peak_mem_gb": 1.0}

    monkeypatch.setattr(bench_run, "spawn", case_process)
    monkeypatch.setattr(bench_run, "_on_gpu", lambda: True)
    results, rows = bench_run.mode_fastpaths(_lease_args())
    assert spawned.count(("defaults", 64)) == 1 and ("largest batch", 64) not in spawned
    assert ("largest batch + torch.compile", 64) not in spawned
    largest = next(r for r in results if r["case"]["label"] == "largest batch")
    assert largest["case"]["batch"] == 64 and largest["images_per_s"] == 64
    assert "| sd2 | largest batch | 64 | 64.00 | **1.00×** |" in "\n".join(rows)
    ckpt = next(r for r in results if r["case"]["label"] == "largest batch + gradient checkpointing")
    assert ckpt["case"]["batch"] == 128 and ckpt["case"]["grad_ckpt"]


def test_sizes_are_the_documented_ones():
    params = {}
    for size in SIZES:
        with torch.device("meta"):
            params[size] = sum(p.numel() for p in CrossAttentionUNet(**unet_kwargs(size)).parameters())
    assert params == {"tiny": 4_283_012, "mid": 164_897_092, "sd2": 865_910_724}


def test_plot_run_renders_a_metrics_csv(tmp_path):
    from PIL import Image

    from scripts.plot_run import plot, read_csv_history

    csv_path = tmp_path / "metrics.csv"
    lines = ["step,train/loss,train_loss_by_t/0000-0099,perf/images_per_sec,perf/data_wait_frac,lr-AdamW"]
    lines += [f"{s},{1 / (s + 1)},{2 / (s + 1)},{100 + s},0.05,{1e-4 * min(1, s / 5)}" for s in range(20)]
    csv_path.write_text("\n".join(lines) + "\n")
    rows = read_csv_history(csv_path)
    assert len(rows) == 20 and rows[3]["train/loss"] == 0.25
    plot(rows, tmp_path / "dash.png", "test")
    with Image.open(tmp_path / "dash.png") as im:
        assert im.width > 1000 and im.height > 500


def test_vae_judge_on_an_identity_autoencoder_and_a_blurring_one():
    """bench/vae_judge.py's report: renders are all recognised; a 4× box blur (what a weak f4 decoder does) costs
    shapes; with every shape drawn equally often, the overall share is the mean of the per-shape ones."""
    import numpy as np
    from PIL import Image

    from bench.vae_judge import renders, shape_report

    images, specs = renders(36, 32, seed=0)
    clean = shape_report(images, specs)
    assert clean["shape"] == 1.0 and clean["confusions"] == {}
    blurred = [
        im.resize((8, 8), Image.Resampling.BOX).resize((32, 32), Image.Resampling.BILINEAR) for im in images
    ]
    report = shape_report(blurred, specs)
    assert report["shape"] < 1.0 and sum(report["confusions"].values()) == round((1 - report["shape"]) * 36)
    assert report["shape"] == pytest.approx(np.mean(list(report["per_shape"].values())))


def test_fsdp_bench_holds_half_the_training_state_on_each_of_two_ranks():
    """bench/fsdp_memory.py with strategy=fsdp's plan over 2 CPU processes: rank 0 holds its half of parameters,
    gradients, AdamW moments and EMA, against DDP's 20 bytes per parameter (4 + 4 + 8 + 4, computed here)."""
    from bench.fsdp_memory import run

    result = run("tiny", "fsdp", ranks=2, batch=2, steps=1, bf16=False, port=29619)
    ddp_bytes = 20 * result["params"]
    assert result["params"] == sum(p.numel() for p in CrossAttentionUNet(**unet_kwargs("tiny")).parameters())
    # FSDP splits each tensor along dim 0 and rank 0 takes the larger part of an odd split
    assert 0.5 <= result["state_gb"] * 2**30 / ddp_bytes < 0.52
    assert result["step_ms"] > 0


def test_ema_mode_measures_both_averages_and_a_float16_snapshot(tmp_path):
    cmd = [sys.executable, "bench/run.py", "ema", "--quick", "--json-dir", str(tmp_path), "--markdown", ""]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = json.loads((tmp_path / "ema.json").read_text())["results"]
    assert result["size"] == "tiny" and result["ema_ms"] > 0 and result["posthoc_ms"] > 0
    # two averages of every parameter at 2 bytes each, plus the file's header
    assert result["snapshot_gb"] * 1e9 == pytest.approx(2 * 2 * result["params"], rel=0.02)
    assert "| tiny |" in proc.stdout


def test_eval_mode_times_both_extractors_and_precision_recall(tmp_path):
    cmd = [sys.executable, "bench/run.py", "eval", "--quick", "--json-dir", str(tmp_path), "--markdown", ""]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert result["dinov2_size"] == [384, 12] and result["prc_images"] == 500
    for key in ("inception_ms_per_image", "dinov2_ms_per_image", "prc_2048_s", "prc_1024_s"):
        assert result[key] > 0, key
    assert "| DINOv2 ViT-S/14, 224 px (ms/image) |" in proc.stdout  # quick: the small one


def _lease_args():
    """`bench/run.py fastpaths` as the GPU lease runs it, for the SD2-size UNet."""
    import argparse

    return argparse.Namespace(
        fast_sizes=["sd2"],
        quick=False,
        compile=False,
        encode=False,
        batch=None,
        iters=5,
        warmup=2,
        cpu_peak={},
    )
