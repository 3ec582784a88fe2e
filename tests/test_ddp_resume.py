"""2-process CPU (gloo) training through `train.py`, preempted with USR1 and resumed, against an uninterrupted DDP
run: the same samples at every step on every rank; with DDP bit-identical final weights and optimizer state, with
FSDP (`strategy=fsdp`, the UNet sharded over the two ranks) the same up to fp32 rounding, in the same format."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.data.synthetic import write_synthetic_shards

from .helpers import FAST, ROOT, compose_train

pytestmark = pytest.mark.slow
MAX_STEPS = 14
NAN_STEP = 1  # Trainer.global_step of the batch made NaN on rank 1: the run's second optimizer step


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Shards (4 of 24: one per worker of each rank) and a 1-step stage-1 checkpoint."""
    from ldm.training.run import train

    shards = tmp_path_factory.mktemp("ddp-shards")
    write_synthetic_shards(shards, num_samples=96, samples_per_shard=24, resolution=32, seed=0)
    cfg = compose_train(
        "experiment=vae_tiny",
        f"data.train_urls={shards}",
        "trainer.max_steps=1",
        "logger=csv",
        "stage.latent_stats_samples=8",
        *FAST,
        run_dir=str(tmp_path_factory.mktemp("ddp-vae")),
    )
    return str(shards), train(cfg)["checkpoint"]


def _command(
    setup, run_dir: Path, hold_at: int | None = None, strategy: str = "ddp", every: int = 1000
) -> list[str]:
    shards, vae = setup
    hold = f"+callbacks.hold={{_target_: tests.callbacks.HoldForPreemption, step: {hold_at}}}"
    return [
        sys.executable,
        "train.py",
        "experiment=tiny",
        f"data.train_urls={shards}",
        f"autoencoder_ckpt={vae}",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp" if strategy == "ddp" else f"strategy={strategy}",
        "trainer.enable_progress_bar=false",
        "data.resampled=false",  # one epoch = 24 samples per worker: 3 batches; epochs roll over
        "data.num_workers=2",
        "data.persistent_workers=false",
        # under FSDP: one grid at the end, sampled by both ranks with the sharded EMA
        *(
            ["callbacks.sample_grid=null"]
            if strategy == "ddp"
            else [
                "callbacks.sample_grid.every_n_steps=0",
                "callbacks.sample_grid.num_per_prompt=1",
                "sampler.num_steps=2",
            ]
        ),
        f"callbacks.model_checkpoint.every_n_train_steps={every}",
        # post-hoc EMA: its averages resume with the rest (sharded under FSDP), snapshots every 4 steps
        "stage.posthoc_ema=[0.05,0.1]",
        "callbacks.posthoc_ema.every_n_steps=4",
        "callbacks.posthoc_ema.dtype=float32",
        f"+callbacks.sample_log={{_target_: ldm.training.resume.SampleLogCallback, dir: {run_dir}/samples}}",
        # every run here meets a NaN batch on rank 1 alone at step 2 (_assert_nan_step_skipped_on_both)
        f"+callbacks.poison={{_target_: tests.callbacks.PoisonBatches, steps: [{NAN_STEP}], ranks: [1]}}",
        f"+callbacks.weights={{_target_: tests.callbacks.WeightLog, dir: {run_dir}/weights}}",
        f"hydra.run.dir={run_dir}",
        *[o for o in FAST if not o.startswith("data.num_workers")],
        *([hold] if hold_at is not None else []),
    ]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive", "WANDB_MODE": "offline"}


def _log(run_dir: Path, rank: int) -> list[dict]:
    path = run_dir / "samples" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _run(setup, run_dir: Path, strategy: str = "ddp", every: int = 1000) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _command(setup, run_dir, strategy=strategy, every=every),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _preempt_when_training(
    setup, run_dir: Path, at_step: int = 3, strategy: str = "ddp"
) -> subprocess.CompletedProcess:
    """Start the run; once both ranks have started step `at_step`, send each of them USR1 (as Slurm does).
    The ranks wait for it at the end of that step, so the run stops after step `at_step` + 1 however fast it is."""
    proc = subprocess.Popen(
        _command(setup, run_dir, hold_at=at_step + 1, strategy=strategy),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        logs = [_log(run_dir, r) for r in (0, 1)]
        if all(log and log[-1]["step"] >= at_step for log in logs):
            for log in logs:
                os.kill(log[-1]["pid"], signal.SIGUSR1)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _assert_nan_step_skipped_on_both(run_dir: Path) -> None:
    """Rank 1 alone got a NaN batch at step 2. DDP's averaged gradients (FSDP's global norm) carried the NaN to
    rank 0, so both ranks skipped that step (ldm.training.nonfinite) and stayed identical."""
    logs = [
        [json.loads(line) for line in (run_dir / "weights" / f"rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert (
        [line["step"] for line in logs[0]]
        == [line["step"] for line in logs[1]]
        == list(range(1, MAX_STEPS + 1))
    )
    for a, b in zip(*logs, strict=True):
        assert (a["sum"], a["ema_sum"]) == (b["sum"], b["ema_sum"])  # the ranks never part
    sums = [(line["sum"], line["ema_sum"]) for line in logs[0]]
    assert sums[NAN_STEP] == sums[NAN_STEP - 1]  # the skipped step changed neither weights nor EMA
    assert all(sums[i] != sums[i - 1] for i in range(1, MAX_STEPS) if i != NAN_STEP)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["nonfinite_steps"] == {"train/grad_norm": 1}  # across the resume, for the preempted runs
    assert int(ckpt["state_dict"]["ema.num_updates"]) == MAX_STEPS - 1


def _steps(run_dir: Path, rank: int) -> dict[int, list[str]]:
    return {line["step"]: line["keys"] for line in _log(run_dir, rank)}


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> Path:
    """The uninterrupted DDP run both strategies' preempted runs are compared with."""
    run = tmp_path_factory.mktemp("ddp-reference") / "uninterrupted"
    _run(setup, run)
    return run


def _preempt_and_resume(setup, run: Path, strategy: str) -> tuple[str, str]:
    """Preempt a run after step 4, rerun the same command; the two runs' logs."""
    first = _preempt_when_training(setup, run, strategy=strategy)
    hpc = run / "hpc_ckpt_1.ckpt"
    assert hpc.is_file()
    stopped_at = torch.load(hpc, weights_only=True, map_location="cpu")["global_step"]
    assert stopped_at == 4, "the signal lands after step 3 (the run holds there for it)"
    # the same command, the same run dir: resumes from hpc_ckpt_1
    second = _run(setup, run, strategy=strategy)
    assert "preemption signal: saved" in first.stderr + first.stdout
    return first.stderr + first.stdout, second.stderr + second.stdout


def _assert_same_samples(reference: Path, run: Path) -> None:
    """The same samples at every step on each rank; each step once over the two runs."""
    for rank in (0, 1):
        expected = _steps(reference, rank)
        assert sorted(expected) == list(range(MAX_STEPS))
        lines = _log(run, rank)
        assert [line["step"] for line in lines] == list(range(MAX_STEPS))
        assert {line["step"]: line["keys"] for line in lines} == expected
        assert len({line["pid"] for line in lines}) == 2  # two processes: before and after the preemption


def _assert_same_snapshots(reference: Path, run: Path, atol: float) -> None:
    """The post-hoc EMA snapshots (steps 4, 8, 12 and the end; the one at 4 written before the preemption) hold
    the reference's averages; t leaves out the NaN step."""
    from safetensors.torch import load_file

    from ldm.training.posthoc_ema import find_snapshots

    ours, theirs = (find_snapshots(r / "checkpoints" / "posthoc_ema") for r in (run, reference))
    assert (
        [(s.step, s.t) for s in ours]
        == [(s.step, s.t) for s in theirs]
        == [(4, 3), (8, 7), (12, 11), (14, 13)]
    )
    for a, b in zip(ours, theirs, strict=True):
        tensors_a, tensors_b = load_file(a.path), load_file(b.path)
        assert tensors_a.keys() == tensors_b.keys()
        for name, value in tensors_b.items():
            torch.testing.assert_close(tensors_a[name], value, rtol=0, atol=atol, msg=name)


def test_preempted_ddp_run_resumes_exactly(setup, reference, tmp_path):
    run = tmp_path / "preempted"
    _, second = _preempt_and_resume(setup, run, "ddp")
    assert "resuming from" in second and "hpc_ckpt_1.ckpt" in second
    _assert_same_samples(reference, run)
    # ranks see different samples; within an epoch (3 steps × 2 ranks × 8) every sample once
    r0, r1 = _steps(reference, 0), _steps(reference, 1)
    epoch0 = [k for s in range(6) for k in r0[s] + r1[s]]
    assert len(epoch0) == len(set(epoch0)) == 96

    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name  # bit-identical, EMA included
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # throughput state: images over both ranks, carried across the resume; FLOPs counted once, in the first run
    hpc = run / "hpc_ckpt_1.ckpt"
    speed = [ckpt["callbacks"]["ThroughputCallback"] for ckpt in (a, b, torch.load(hpc, weights_only=True))]
    assert [s["samples_seen"] for s in speed] == [MAX_STEPS * 16, MAX_STEPS * 16, 4 * 16]
    assert speed[0]["flops_per_batch"] > 0 and speed[1]["flops_per_batch"] == speed[2]["flops_per_batch"]

    _assert_same_snapshots(reference, run, atol=0)

    # one W&B run across the preemption: both offline run dirs carry the id of run_dir/wandb_id.txt
    _assert_nan_step_skipped_on_both(reference)
    _assert_nan_step_skipped_on_both(run)

    run_id = (run / "wandb_id.txt").read_text().strip()
    dirs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.name.endswith(run_id) for d in dirs)


def test_a_killed_run_rerun_resumes_from_its_newest_checkpoint(setup, reference, tmp_path):
    """SIGKILL to every process of the run (a node failure or the out-of-memory killer: no chance to save
    anything) during step 6, with full checkpoints every 2 steps. The same command in the same run dir (what a
    requeued Slurm job runs) resumes from the newest checkpoint there: step 4, not the older hpc_ckpt that an
    earlier preemption left at step 2 (stood in for by the step-2 checkpoint), nor step 0. It then trains on
    exactly the reference's samples and ends bit-identical to it."""
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(setup, run, hold_at=6, every=2),  # held after step 6: the kill lands before its checkpoint
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        start_new_session=True,  # its own process group: both ranks and their loader workers
    )
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if all(
            (log := _log(run, r)) and log[-1]["step"] >= 5 for r in (0, 1)
        ):  # step 4's checkpoint is written
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    saved = {
        p.name: torch.load(p, weights_only=True, mmap=True)["global_step"] for p in run.glob("**/*.ckpt")
    }
    assert saved == {"step_0000002.ckpt": 2, "step_0000004.ckpt": 4, "last.ckpt": 4}
    (run / "checkpoints" / "step_0000002.ckpt").rename(run / "hpc_ckpt_1.ckpt")

    second = _run(setup, run, every=2)
    assert "(step 4: the newest checkpoint in the run dir)" in second.stderr + second.stdout
    for rank in (0, 1):
        expected, lines = _steps(reference, rank), _log(run, rank)
        resumed = [line for line in lines if line["pid"] == lines[-1]["pid"]]
        assert [line["step"] for line in resumed] == list(range(4, MAX_STEPS))
        assert {line["step"]: line["keys"] for line in lines} == expected  # the killed run's steps 4-5 again
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_preempted_fsdp_run_resumes_and_matches_ddp(setup, reference, tmp_path):
    """strategy=fsdp: UNet, EMA and AdamW state sharded over the ranks. The preempted and resumed run sees the
    reference's samples, and ends where DDP ends up to fp32 rounding (a lost optimizer state or EMA on resume
    would be orders of magnitude further off), with a checkpoint of the same keys, shapes and format."""
    run = tmp_path / "fsdp"
    first, second = _preempt_and_resume(setup, run, "fsdp")
    assert "FSDP: sharded CrossAttentionUNet (" in first and "over DeviceMesh" in first
    sharded = next(line for line in first.splitlines() if "FSDP: sharded" in line)
    assert sharded.count("CrossAttentionUNet (") == 4  # the UNet, its EMA and the two post-hoc EMA averages
    assert "resuming from" in second and "hpc_ckpt_1.ckpt" in second
    _assert_same_samples(reference, run)
    assert (run / "samples" / f"step_{MAX_STEPS:07d}.png").is_file()  # the grid, written by rank 0 only

    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert b["global_step"] == MAX_STEPS
    _assert_nan_step_skipped_on_both(run)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        other = b["state_dict"][name]
        assert type(other) is torch.Tensor and other.shape == tensor.shape, name  # whole tensors, not shards
        torch.testing.assert_close(other, tensor, rtol=0, atol=1e-5, msg=name)
    at_4 = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    moved = max((b["state_dict"][k] - v).abs().max() for k, v in at_4.items() if k.startswith("unet."))
    assert moved > 1e-3  # steps 5-14 moved the weights far more than the tolerance
    _assert_same_snapshots(reference, run, atol=1e-5)  # gathered from the shards by both ranks
    oa, ob = a["optimizer_states"][0], b["optimizer_states"][0]
    assert [g["params"] for g in oa["param_groups"]] == [g["params"] for g in ob["param_groups"]]
    for i, sa in oa["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ob["state"][i][k], sa[k], rtol=0, atol=1e-7)
    assert ob["state"][0]["step"] == MAX_STEPS - 1  # the NaN step is not an AdamW step


def test_finite_epochs_end_on_every_rank_at_the_same_step(setup, tmp_path):
    """data.resampled=false over 5 shards of 16: rank 0 reads 3 (6 batches of 8 an epoch), rank 1 reads 2 (4
    batches). Both ranks end each epoch after 4 steps (rank 0's surplus dropped), within an epoch no sample is
    seen twice, and 2 epochs take 8 steps on each; without agreeing, rank 0 would go on alone into a gradient
    all-reduce that rank 1 never joins."""
    shards = tmp_path / "uneven-shards"
    write_synthetic_shards(shards, num_samples=80, samples_per_shard=16, resolution=32, seed=1)
    run = tmp_path / "uneven"
    left_out = ("+callbacks.poison=", "stage.posthoc_ema=", "callbacks.posthoc_ema.")
    command = [a for a in _command((str(shards), setup[1]), run) if not a.startswith(left_out)]
    command.append("trainer.max_epochs=2")  # before MAX_STEPS
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [_steps(run, rank) for rank in (0, 1)]
    assert sorted(steps[0]) == sorted(steps[1]) == list(range(8))
    for epoch in (range(4), range(4, 8)):
        keys = [k for s in epoch for rank in (0, 1) for k in steps[rank][s]]
        assert len(keys) == len(set(keys)) == 64  # 4 steps × 2 ranks × 8 of the 80 samples
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 8
