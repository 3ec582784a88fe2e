"""slurm/*.sbatch on a real local Slurm cluster (scripts/slurm_local.sh: two emulated nodes).

- train_multinode.sbatch: 2 nodes × 1 task, CPU DDP. Preempted with `scancel --signal=USR1` once training runs; the
  job must checkpoint, requeue itself, restore from that checkpoint and finish, with every rank taking exactly the
  samples an uninterrupted stream gives.
- cache_latents.sbatch: 2 tasks split the shards; USR1 requeues the job, which keeps the shards already complete.
- eval.sbatch: 2 tasks evaluate a checkpoint together and report the numbers of one process."""

import json
import os
import re
import socket
import subprocess
import sys
import tarfile
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


def _expected_keys(setup, run_dir: Path, rank: int, monkeypatch, world_size: int = 2) -> list[list[str]]:  # noqa: F811
    """The batches rank `rank` of `world_size` takes in an uninterrupted run: the same loader, iterated here."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    cfg = compose_train(*[o for o in _overrides(setup, run_dir) if not o.startswith(("+", "hydra."))])
    loader = instantiate(cfg.data).train_dataloader()
    return [batch["key"] for batch in islice(loader, MAX_STEPS)]


def _job_env() -> dict:
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
    return env


def test_preempted_slurm_job_requeues_and_resumes_exactly(cluster, setup, tmp_path, monkeypatch):  # noqa: F811
    run_dir = tmp_path / "run"
    out = tmp_path / "slurm-%j.out"
    env = _job_env()
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
    assert "preemption signal: saved" in text and f"requeueing Slurm job {job}" in text
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


def test_slurm_cache_job_splits_the_shards_and_requeues_keeping_complete_ones(cluster, setup, tmp_path):  # noqa: F811
    from ldm.data.latents import decode_latents_member
    from ldm.inference import load_autoencoder
    from ldm.latent_cache import cache_info, cache_latents

    shards, vae = setup
    reference, out_dir = tmp_path / "reference", tmp_path / "cache"
    ae, bundle = load_autoencoder(vae)
    info = cache_info(vae, bundle, 32, "center", None, shards, ae)
    cache_latents(ae, shards, reference, 32, batch_size=8, num_workers=0, info=info, progress=False)
    # a caching job that was stopped after its first shard: that shard is complete, the next one half written
    names = sorted(p.name for p in reference.glob("*.tar"))
    out_dir.mkdir()
    (out_dir / names[0]).write_bytes((reference / names[0]).read_bytes())
    (out_dir / f".{names[1]}.tmp").write_bytes(b"partial")
    (out_dir / "cache_info.json").write_bytes((reference / "cache_info.json").read_bytes())
    kept = (out_dir / names[0]).stat().st_mtime_ns

    log = tmp_path / "slurm-%j.out"
    overrides = [
        f"autoencoder_ckpt={vae}",
        f"urls={shards}",
        f"out_dir={out_dir}",
        "batch_size=8",
        "num_workers=0",
    ]
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", f"--output={log}"]
        + ["slurm/cache_latents.sbatch", *overrides, "device=cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_job_env(),
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    output = Path(str(log).replace("%j", job))
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    deadline = time.monotonic() + 600  # a guard against a hung job, not a speed requirement
    signalled = False
    while time.monotonic() < deadline and _job_state(job) not in done:
        text = output.read_text() if output.is_file() else ""
        if not signalled and "restart 0:" in text:  # the batch shell's trap is set; the tasks are starting
            subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
            signalled = True
        time.sleep(0.2)
    if _job_state(job) not in done:
        subprocess.run(["scancel", job])
    text = output.read_text() if output.is_file() else ""
    print(text[-6000:])
    assert signalled and _job_state(job) == "COMPLETED", text[-4000:]
    assert "USR1, requeueing" in text and "restart 1:" in text
    assert re.search(r"rank 0/2: .*shards written", text) and re.search(r"rank 1/2: .*shards written", text)

    assert sorted(p.name for p in out_dir.glob("*.tar")) == names and not list(out_dir.glob(".*.tmp"))
    assert (out_dir / names[0]).stat().st_mtime_ns == kept  # complete before: not encoded again
    for name in names:
        with tarfile.open(out_dir / name) as got, tarfile.open(reference / name) as want:
            a = {m.name: got.extractfile(m).read() for m in got.getmembers()}
            b = {m.name: want.extractfile(m).read() for m in want.getmembers()}
        assert a.keys() == b.keys()
        for member in a:
            if member.endswith(".latents.safetensors"):
                x, y = decode_latents_member(a[member]), decode_latents_member(b[member])
                torch.testing.assert_close(x["latent_mean"], y["latent_mean"], atol=2e-3, rtol=2e-3)
            else:
                assert a[member] == b[member], member  # captions and metadata travel unchanged


def test_slurm_eval_job_gives_the_one_process_numbers(cluster, setup, tmp_path):  # noqa: F811
    """eval.sbatch on 2 nodes × 1 task: the ranks meet through srun's environment (no torchrun), share the images
    out, and report what one process reports for the same checkpoint, protocol and reference."""
    from eval.dinov2 import save_random_dinov2_weights
    from eval.features import save_random_inception_weights
    from ldm.training.run import train

    from .helpers import FAST

    shards, vae = setup
    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={shards}",
        f"autoencoder_ckpt={vae}",
        "trainer.max_steps=2",
        "logger=csv",
        "callbacks.sample_grid=null",
        *FAST,
        run_dir=str(tmp_path / "stage2"),
    )
    ckpt = train(cfg)["checkpoint"]
    args = [
        f"ckpt={ckpt}",
        "prompts=[a red circle,a blue square,a green star]",
        f"reference={shards}",
        "reference_num_images=12",
        f"reference_cache_dir={tmp_path / 'cache'}",
        f"inception_weights={save_random_inception_weights(tmp_path / 'inception.pth')}",
        "fd_dinov2=true",
        f"dinov2_weights={save_random_dinov2_weights(tmp_path / 'dinov2.pth')}",
        "clip_model=null",
        "num_images=8",
        "batch_size=2",
        "sampler.num_steps=2",
        "progress=false",
    ]
    one = subprocess.run(
        [sys.executable, "eval/fid.py", *args, f"out_dir={tmp_path / 'one'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**_job_env(), "HF_HUB_OFFLINE": "1"},
    )
    assert one.returncode == 0, one.stderr[-4000:]

    log = tmp_path / "slurm-%j.out"
    submit = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]
        + [f"--output={log}", "slurm/eval.sbatch", *args, f"out_dir={tmp_path / 'slurm'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**_job_env(), "HF_HUB_OFFLINE": "1"},
        timeout=900,  # a guard against a hung job, not a speed requirement
    )
    job = submit.stdout.strip().split(";")[0]
    text = Path(str(log).replace("%j", job)).read_text() if job else ""
    assert submit.returncode == 0, submit.stderr + text[-4000:]
    assert "2 task(s)" in text and "eval/fid.py exited" in text

    single = json.loads((tmp_path / "one" / "result.json").read_text())
    slurm = json.loads((tmp_path / "slurm" / "result.json").read_text())
    assert single["run"]["world_size"] == 1 and slurm["run"]["world_size"] == 2
    assert set(slurm["metrics"]) == set(single["metrics"]) and "fd_dinov2" in slurm["metrics"]
    for key, value in single["metrics"].items():
        assert slurm["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


def test_submitit_sweep_jobs_checkpoint_requeue_and_resume(cluster, setup, tmp_path, monkeypatch):  # noqa: F811
    """`train.py -m hydra/launcher=submitit_slurm`: each sweep point is one task of a Slurm job array. submitit has
    Slurm send USR2 before the time limit (here `scancel --signal=USR2`); each job must checkpoint at the step
    boundary, leave the requeue to submitit (same sweep job, same run dir) and resume exactly."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from scripts.plot_run import wandb_records

    sweep = tmp_path / "sweep"
    overrides = [o for o in _overrides(setup, sweep) if not o.startswith(("hydra.", "+callbacks.sample_log"))]
    launcher = subprocess.Popen(
        [sys.executable, "train.py", "-m", "hydra/launcher=submitit_slurm", *overrides]
        + [
            "optim.lr=1e-4,2e-4",
            "+callbacks.sample_log={_target_: ldm.training.resume.SampleLogCallback, dir: '${run_dir}/samples'}",
        ]
        + ["+callbacks.hold={_target_: tests.callbacks.HoldForPreemption, step: 4}"]
        + [f"hydra.sweep.dir={sweep}", "hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=null"]
        + ["hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=60"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_job_env(),
    )

    def arrays() -> set[str]:  # the sweep's Slurm job array(s), from submitit's folders <array>_<task>
        return {p.name.split("_")[0] for p in (sweep / ".submitit").glob("*_*") if p.name[0].isdigit()}

    deadline = time.monotonic() + 1200  # a guard against a hung job, not a speed requirement
    signalled = False
    try:
        while time.monotonic() < deadline and launcher.poll() is None:
            logs = [_log(sweep / str(num), 0) for num in (0, 1)]
            if not signalled and all(log and log[-1]["step"] >= 3 for log in logs):
                assert len(arrays()) == 1, arrays()
                subprocess.run(["scancel", "--signal=USR2", *arrays()], check=True)
                signalled = True
            time.sleep(1)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if (sweep / ".submitit").is_dir() and arrays():  # nothing left running for later tests, pass or fail
            subprocess.run(["scancel", *arrays()], capture_output=True)
    text = launcher.stdout.read()
    logs = {p: p.read_text() for p in sweep.glob(".submitit/*/*_log.*")}
    print(text[-3000:], *(f"--- {p}\n{t[-3000:]}" for p, t in logs.items()))
    assert signalled, "training never reached step 3"
    assert launcher.returncode == 0, text[-3000:]

    expected = _expected_keys(setup, sweep, 0, monkeypatch, world_size=1)
    for num, lr in ((0, "0.0001"), (1, "0.0002")):
        run_dir = sweep / str(num)
        assert f"optim.lr={lr}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert (
            torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True, map_location="cpu")["global_step"] == 4
        )
        final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
        assert final["global_step"] == MAX_STEPS
        lines = _log(run_dir, 0)
        assert [line["step"] for line in lines] == list(range(MAX_STEPS))  # steps 4.. once, after the requeue
        assert [line["restart"] for line in lines] == [0] * 4 + [1] * (MAX_STEPS - 4)
        assert [line["keys"] for line in lines] == expected
        # one W&B run per point, continued by the requeued job (a second offline folder, the same run id), named
        # apart and grouped by sweep
        records = [wandb_records(f) for f in sorted(run_dir.glob("wandb/offline-run-*/*.wandb"))]
        runs = [r.run for recs in records for r in recs if r.WhichOneof("record_type") == "run"]
        assert len(records) == 2 and len(runs) >= 2
        assert {(r.display_name, r.run_group) for r in runs} == {(f"tiny-{num}", "tiny-sweep")}
        assert len({r.run_id for r in runs}) == 1
    job_logs = "\n".join(logs.values())
    assert job_logs.count("the requeue is left to SignalHandler.checkpoint_and_try_requeue") == 2
    assert job_logs.count("resuming from") == 2 and "Requeued job" in job_logs
