"""End to end on tiny configs: stage 1, stage 2, resume, sample — real shards, Trainer, wandb (offline), CLIs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.data.synthetic import write_synthetic_shards
from ldm.inference import TextToImage
from ldm.utils.checkpoint import load_bundle
from ldm.utils.images import read_png_metadata

from .helpers import FAST, ROOT, compose_train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    paths = write_synthetic_shards(out, num_samples=96, samples_per_shard=48, resolution=32, seed=0)
    return str(out), paths  # a folder of shards is a valid train_urls


@pytest.fixture(scope="module")
def vae_run(shards, tmp_path_factory):
    from ldm.training.run import train

    run_dir = tmp_path_factory.mktemp("vae")
    cfg = compose_train(
        "experiment=vae_tiny",
        f"data.train_urls={shards[0]}",
        f"data.val_urls={shards[1][0]}",
        "trainer.max_steps=3",
        "trainer.val_check_interval=2",
        "stage.loss.disc_start=1",  # the PatchGAN trains from the second step on
        "stage.latent_stats_samples=16",
        "callbacks.reconstruction_grid.every_n_steps=2",
        *FAST,
        run_dir=str(run_dir),
    )
    return train(cfg), cfg


@pytest.fixture(scope="module")
def ldm_run(vae_run, shards, tmp_path_factory):
    from ldm.training.run import train

    run_dir = tmp_path_factory.mktemp("ldm")
    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={shards[0]}",
        f"autoencoder_ckpt={vae_run[0]['checkpoint']}",
        "trainer.max_steps=4",
        "sampler.num_steps=3",
        "callbacks.sample_grid.every_n_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        *FAST,
        run_dir=str(run_dir),
    )
    return train(cfg), cfg


def test_stage1_writes_a_self_describing_checkpoint(vae_run):
    vae_run, _ = vae_run
    bundle, ckpt = load_bundle(vae_run["checkpoint"])
    assert bundle["stage"] == "autoencoder" and bundle["downsample_factor"] == 4
    assert bundle["config"]["autoencoder"]["_target_"] == "ldm.models.KLAutoencoder"
    # one step per batch, although the discriminator's optimizer stepped too (Lightning #17958)
    assert ckpt["global_step"] == 3 and vae_run["global_step"] == 3
    assert any(k.startswith("autoencoder.") for k in ckpt["state_dict"])
    assert any(k.startswith("loss.discriminator.") for k in ckpt["state_dict"])
    assert list((Path(vae_run["run_dir"]) / "reconstructions").glob("*.png"))
    metrics = vae_run["metrics"]
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert {"train/disc_loss", "train/d_weight", "train/g_loss", "val/psnr", "val/ssim", "val/l1"} <= set(
        metrics
    )
    # the latent scale stage 2 needs, measured on the held-out shard at the end of training
    stats = bundle["latent_stats"]
    assert stats["num_samples"] == 16 and bundle["latent_scale"] == pytest.approx(1 / stats["std"])
    assert bundle["latent_shift"] == 0.0


def test_stage1_resumes_both_optimizers(vae_run, tmp_path):
    from ldm.training.run import train

    result, cfg = vae_run
    before = torch.load(result["checkpoint"], weights_only=True)
    assert len(before["optimizer_states"]) == 2
    resumed_cfg = cfg.copy()
    resumed_cfg.ckpt_path = result["checkpoint"]
    resumed_cfg.trainer.max_steps = 5
    resumed_cfg.run_dir = str(tmp_path)
    resumed = train(resumed_cfg)
    after = torch.load(resumed["checkpoint"], weights_only=True)
    assert resumed["global_step"] == 5
    for i, steps in enumerate(
        (3, 2)
    ):  # the autoencoder stepped every batch, the discriminator from step 1 on
        assert before["optimizer_states"][i]["state"][0]["step"] == steps
        assert after["optimizer_states"][i]["state"][0]["step"] == steps + 2


def test_stage2_checkpoint_describes_itself(ldm_run):
    result, _ = ldm_run
    bundle, ckpt = load_bundle(result["checkpoint"])
    assert bundle["stage"] == "diffusion"
    assert 0.0 < bundle["latent_scale"] < 100.0  # measured on the first batch, not a constant
    assert bundle["text_encoder"]["model_name"] == "ldm-tiny-text"
    assert bundle["text_encoder"]["weights_in_checkpoint"] is True
    assert bundle["config"]["diffusion"]["prediction"] == "v"
    state = ckpt["state_dict"]
    for prefix in ("unet.", "ema.module.", "codec.autoencoder.", "text_encoder."):
        assert any(k.startswith(prefix) for k in state), prefix
    assert int(state["ema.num_updates"]) == 4
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    # periodic checkpoints and the sample grids of the callback
    names = {p.name for p in (Path(result["run_dir"]) / "checkpoints").iterdir()}
    assert {"last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"} <= names
    assert len(list((Path(result["run_dir"]) / "samples").glob("step_*.png"))) >= 2


def test_wandb_offline_run_is_written(ldm_run):
    result, _ = ldm_run
    runs = list((Path(result["run_dir"]) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))  # the run's event log (scalars, images, config)


def test_resume_continues_from_the_checkpoint(ldm_run, tmp_path):
    from ldm.training.run import train

    result, cfg = ldm_run
    before = torch.load(result["checkpoint"], weights_only=True)
    resumed_cfg = cfg.copy()
    resumed_cfg.ckpt_path = result["checkpoint"]
    resumed_cfg.trainer.max_steps = 6
    resumed_cfg.run_dir = str(tmp_path)
    resumed = train(resumed_cfg)
    after = torch.load(resumed["checkpoint"], weights_only=True)
    assert resumed["global_step"] == 6
    assert int(after["state_dict"]["ema.num_updates"]) == 6  # EMA state came back too
    assert after["ldm"]["latent_scale"] == before["ldm"]["latent_scale"]  # not re-measured
    step_before = before["optimizer_states"][0]["state"][0]["step"]
    assert after["optimizer_states"][0]["state"][0]["step"] == step_before + 2


def test_pipeline_from_checkpoint_is_reproducible(ldm_run):
    from ldm.diffusion import DDIMSampler

    result, _ = ldm_run
    pipe, bundle = TextToImage.from_checkpoint(result["checkpoint"])
    sampler = DDIMSampler(num_steps=3)
    a = pipe(["a red circle on a blue background", "a blue star"], sampler, guidance_scale=3.0, seeds=[7, 8])
    b = pipe(["a blue star"], sampler, guidance_scale=3.0, seeds=[8])
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=0)  # an image depends on its seed, not its batch


def test_sample_cli_writes_grid_and_png_metadata(ldm_run, tmp_path):
    result, _ = ldm_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a red circle on a blue background\n# a comment\n\na green square on a white background\n"
    )
    out = tmp_path / "samples"
    cmd = [
        sys.executable,
        "sample.py",
        f"ckpt={result['checkpoint']}",
        f"prompts_file={prompts}",
        f"out_dir={out}",
        "sampler.num_steps=3",
        "num_per_prompt=2",
        "guidance_scale=2.5",
        "seed=5",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"grid written to {out / 'grid.png'}" in proc.stdout
    images = sorted((out / "images").glob("*.png"))
    assert len(images) == 4
    meta = read_png_metadata(images[1])
    assert meta["prompt"] == "a red circle on a blue background" and meta["seed"] == 6
    assert meta["steps"] == 3 and meta["guidance_scale"] == 2.5 and meta["sampler"] == "DDIMSampler"
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 2 * 32
        assert json.loads(grid.text["ldm"])["prompts"][1] == "a green square on a white background"


def test_stage2_without_autoencoder_fails_clearly(shards, tmp_path):
    from ldm.training.run import train

    cfg = compose_train("experiment=tiny", f"data.train_urls={shards[0]}", run_dir=str(tmp_path))
    with pytest.raises(ValueError, match="autoencoder_ckpt="):
        train(cfg)


def test_train_cli_runs(shards, tmp_path):
    """The real entry point with Hydra's own run dir handling."""
    cmd = [
        sys.executable,
        "train.py",
        "experiment=vae_tiny",
        f'data.train_urls="{shards[0]}/shapes-{{000000..000001}}.tar"',
        "trainer.max_steps=2",
        "logger=csv",
        f"hydra.run.dir={tmp_path}",
        *FAST,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
