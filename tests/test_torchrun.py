"""Several processes started by torchrun (how README's multi-node recipe runs outside Slurm), each a real
`train.py` under Lightning's DDP over gloo: stage 1, whose discriminator has no gradients before `disc_start`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from ldm.data.synthetic import write_synthetic_shards

from .helpers import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage1_under_torchrun_ddp_trains_through_disc_start(tmp_path):
    """Before disc_start the discriminator's parameters take no part in the loss, which plain DDP refuses at the
    second step; run.train builds stage 1's DDP with find_unused_parameters, so the run passes disc_start."""
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, num_samples=64, samples_per_shard=16, resolution=32, seed=0)
    run_dir = tmp_path / "run"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"),
        *("--master-addr", "127.0.0.1", "--master-port", str(_free_port())),
        "train.py",
        "experiment=vae_tiny",
        f"data.train_urls={shards}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=3",
        "stage.loss.disc_start=2",
        "stage.latent_stats_samples=8",
        "data.batch_size=4",
        "data.num_workers=0",
        "logger=csv",
        "callbacks.reconstruction_grid=null",
        f"hydra.run.dir={run_dir}",  # one run dir for both processes
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    ae, disc = (int(s["state"][0]["step"]) for s in ckpt["optimizer_states"])
    assert (ae, disc) == (3, 1)  # the discriminator stepped from step 2 (0-based) on
    assert ckpt["ldm"]["config"]["trainer"]["devices"] == 2
