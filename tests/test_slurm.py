"""slurm/train_multinode.sbatch on a real local Slurm cluster (scripts/slurm_local.sh: two emulated nodes): 2 nodes ×
1 task, CPU DDP. Preempted with `scancel --signal=USR1` once training runs; the job must checkpoint, requeue itself,
restore from that checkpoint and finish, with every rank taking exactly the samples an uninterrupted stream gives."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from .helpers import ROOT, compose_train
from .test_ddp_resume import setup  # noqa: F401  (the shards and stage-1 checkpoint)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
MAX_STEPS = 12


@pytest.fixture(scope="module")
def cluster():
    proc = subprocess.run(["bash", "scripts/slurm_local.sh", "up"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 3:
        pytest.skip(f"Slurm cannot be installed here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return True


def _overrides(setup, run_dir: Path) -> list[str]:  # noqa: F811
    shards, vae = setup
    return [
        "experiment=tiny",
        f"data.train_urls={shards}",
        f"autoencoder_ckpt={vae}",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.accelerator=cpu",
        "trainer.strategy=ddp",
        "trainer.enable_progress_bar=false",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        "optim.warmup_steps=2",
        "callbacks.sample_grid=null",
        "callbacks.model_checkpoint.every_n_train_steps=1000",
        f"+callbacks.sample_log={{_target_: ldm.training.resume.SampleLogCallback, dir: {run_dir}/samples}}",
        f"hydra.run.dir={run_dir}",
    ]


def _log(run_dir: Path, rank: int) -> list[dict]:
    path = run_dir / "samples" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else "UNKNOWN"


def _expected_keys(setup, run_dir: Path, rank: int, monkeypatch) -> list[list[str]]:  # noqa: F811
    """The batches rank `rank` of 2 takes in an uninterrupted run: the same loader, iterated here."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = compose_train(*[o for o in _overrides(setup, run_dir) if not o.startswith(("+", "hydra."))])
    loader = instantiate(cfg.data).train_dataloader()
    return [batch["key"] for batch in islice(loader, MAX_STEPS)]


def test_preempted_slurm_job_requeues_and_resumes_exactly(cluster, setup, tmp_path, monkeypatch):  # noqa: F811
    run_dir = tmp_path / "run"
    out = tmp_path / "slurm-%j.out"
    env = {
        **os.environ,
        "LDM_ROOT": str(ROOT),
        "LDM_PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "passive",
        "WANDB_MODE": "offline",
    }
    try:
        socket.gethostbyname("node1")
    except OSError:  # /etc/hosts could not be written (scripts/slurm_local.sh said so)
        env["MASTER_ADDR"] = "127.0.0.1"
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=2",
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            f"--output={out}",
            "slurm/train_multinode.sbatch",
            *_overrides(setup, run_dir),
            "+callbacks.hold={_target_: tests.callbacks.HoldForPreemption, step: 4}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    output = Path(str(out).replace("%j", job))

    deadline = time.monotonic() + 1200  # a guard against a hung job, not a speed requirement
    signalled = False
    while time.monotonic() < deadline:
        state = _job_state(job)
        if not signalled:
            logs = [_log(run_dir, r) for r in (0, 1)]
            if all(log and log[-1]["step"] >= 3 for log in logs):
                # the ranks hold after step 4 until the signal is there (HoldForPreemption)
                subprocess.run(["scancel", "--signal=USR1", job], check=True)
                signalled = True
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(1)
    if _job_state(job) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
        subprocess.run(["scancel", job])
    text = output.read_text() if output.is_file() else ""
    print(text[-6000:])
    assert signalled, f"training never reached step 3; job state {_job_state(job)}"
    assert _job_state(job) == "COMPLETED", text[-4000:]

    # requeued once, restored from the hpc checkpoint, ran to the end
    assert "preemption signal: saved" in text and f"requeued Slurm job {job}" in text
    assert "restart 1:" in text
    assert torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True, map_location="cpu")["global_step"] == 4
    assert re.search(r"Restoring states from the checkpoint path at \S+hpc_ckpt_1\.ckpt", text)
    for rank in (0, 1):
        lines = _log(run_dir, rank)
        assert [line["step"] for line in lines] == list(range(MAX_STEPS))
        restarts = [line["restart"] for line in lines]
        assert restarts[0] == 0 and restarts[-1] == 1 and restarts == sorted(restarts)
        assert [line["keys"] for line in lines] == _expected_keys(setup, run_dir, rank, monkeypatch)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
