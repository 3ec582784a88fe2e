"""End to end on tiny configs: stage 1, stage 2, resume, sample — real shards, Trainer, wandb (offline), CLIs."""

import json
import subprocess
import sys
from pathlib import Path

import hydra.utils
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.synthetic import write_synthetic_shards
from ldm.inference import TextToImage
from ldm.utils.checkpoint import load_bundle, submodule_state
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
        # the training options of issue 7, on: checkpoints must carry them to sample.py
        "diffusion.zero_terminal_snr=true",
        "diffusion.offset_noise=0.05",
        "diffusion.min_snr_gamma=5.0",
        "callbacks.sample_grid.every_n_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.weights_snapshot.every_n_train_steps=2",
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


def test_stage1_measures_the_latent_scale_as_stage_2_encodes(shards, tmp_path):
    """The scale a stage-1 run stores is measured with the autoencoder in eval mode (dropout off), as stage 2 and
    scripts/latent_stats.py encode: here with dropout 0.5, which would shift it if left on."""
    from ldm.inference import load_autoencoder
    from ldm.latent_stats import image_batches, measure_latent_stats
    from ldm.training.run import train

    cfg = compose_train(
        "experiment=vae_tiny",
        f"data.train_urls={shards[0]}",
        f"data.val_urls={shards[1][0]}",
        "trainer.max_steps=1",
        "autoencoder.dropout=0.5",
        "stage.latent_stats_samples=16",
        "callbacks.reconstruction_grid=null",
        *FAST,
        run_dir=str(tmp_path),
    )
    result = train(cfg)
    bundle = load_bundle(result["checkpoint"])[0]
    autoencoder, _ = load_autoencoder(result["checkpoint"])
    assert not autoencoder.training
    batches = image_batches(shards[1][0], cfg.data.resolution, cfg.data.batch_size, seed=0)
    stats = measure_latent_stats(autoencoder.encode, batches, 16, generator=torch.Generator().manual_seed(0))
    assert bundle["latent_stats"]["std"] == pytest.approx(stats.std, rel=1e-6)


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


def test_stage1_resume_from_the_final_checkpoint_matches_a_longer_run(shards, tmp_path):
    """The latent statistics are measured at the end of training, before the final checkpoint is written with the
    random generators' state: measuring must not move them, or a run resumed from that checkpoint would draw other
    posterior samples than one that never stopped."""
    from ldm.training.run import train

    def run(name, max_steps, *extra):
        cfg = compose_train(
            "experiment=vae_tiny",
            f"data.train_urls={shards[0]}",
            f"trainer.max_steps={max_steps}",
            "stage.loss.disc_start=1",
            "stage.latent_stats_samples=8",
            "logger=csv",
            "callbacks.reconstruction_grid=null",
            "callbacks.model_checkpoint=null",
            *FAST,
            *extra,
            run_dir=str(tmp_path / name),
        )
        return torch.load(train(cfg)["checkpoint"], weights_only=True)

    straight = run("straight", 4)
    first = run("first", 2)
    resumed = run("resumed", 4, f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")
    assert first["ldm"]["latent_stats"]["num_samples"] == 8
    assert resumed["global_step"] == straight["global_step"] == 4
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_stage2_checkpoint_describes_itself(ldm_run):
    result, _ = ldm_run
    bundle, ckpt = load_bundle(result["checkpoint"])
    assert bundle["stage"] == "diffusion"
    assert 0.0 < bundle["latent_scale"] < 100.0  # measured on the first batch, not a constant
    assert bundle["text_encoder"]["model_name"] == "ldm-tiny-text"
    assert bundle["text_encoder"]["weights_in_checkpoint"] is True
    assert bundle["config"]["diffusion"]["prediction"] == "v"
    assert bundle["diffusion"] == {
        "schedule": "cosine",
        "num_timesteps": 1000,
        "prediction": "v",
        "zero_terminal_snr": True,
        "offset_noise": 0.05,
        "min_snr_gamma": 5.0,
        "timestep_sampling": "logit_normal",  # experiment=tiny's
        "logit_normal_mean": 0.0,
        "logit_normal_std": 1.0,
    }
    state = ckpt["state_dict"]
    for prefix in ("unet.", "ema.module.", "codec.autoencoder.", "text_encoder."):
        assert any(k.startswith(prefix) for k in state), prefix
    assert int(state["ema.num_updates"]) == 4
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    # periodic checkpoints and the sample grids of the callback
    names = {p.name for p in (Path(result["run_dir"]) / "checkpoints").iterdir()}
    assert {"last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"} <= names
    assert len(list((Path(result["run_dir"]) / "samples").glob("step_*.png"))) >= 2


def test_export_keeps_what_only_diffusers_can_hold(ldm_run, tmp_path):
    """The quickstart-shaped model (pooled-text projection, 16-group UNet, 8-group autoencoder, zero-terminal-SNR
    cosine schedule) exports to diffusers exactly and is refused, with the reason, by the SD single-file layout."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from ldm.export import ExportedParts, export

    ckpt = ldm_run[0]["checkpoint"]
    with pytest.raises(ValueError, match="zero-terminal-SNR.*export in diffusers format"):
        export(ckpt, tmp_path / "m.safetensors", format="sd")
    assert not list(tmp_path.iterdir())  # refused before anything was written
    summary = export(ckpt, tmp_path / "m", use_ema=False)
    assert any("class_labels=pooled" in note for note in summary["notes"])
    parts = ExportedParts(ckpt, use_ema=False)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "m" / "unet").eval()
    assert unet.config.class_embed_type == "simple_projection" and unet.config.norm_num_groups == 16
    assert AutoencoderKL.from_pretrained(tmp_path / "m" / "vae").config.norm_num_groups == 8
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0, 999])
    context, pooled = torch.randn(2, 32, 128, generator=g), torch.randn(2, 64, generator=g)
    with torch.no_grad():
        expected = parts.unet(x, t, context, pooled=pooled)
        got = unet(x, t, encoder_hidden_states=context, class_labels=pooled).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    scheduler = DDIMScheduler.from_pretrained(tmp_path / "m" / "scheduler")
    assert scheduler.alphas_cumprod[-1] == 0  # the rescaled schedule travels as its exact betas
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.steps_offset == 1
    torch.testing.assert_close(scheduler.alphas_cumprod, parts.diffusion.alphas_cumprod.float())


def test_wandb_offline_run_is_written(ldm_run):
    result, _ = ldm_run
    runs = list((Path(result["run_dir"]) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))  # the run's event log (scalars, images, config)


def test_resume_continues_from_the_checkpoint(ldm_run, tmp_path, monkeypatch):
    from ldm.training import run
    from ldm.training.run import train

    read = []  # what the run reads through load_bundle: the stage-1 checkpoint once (it can be GBs)
    monkeypatch.setattr(run, "load_bundle", lambda path, *a: read.append(str(path)) or load_bundle(path, *a))
    result, cfg = ldm_run
    before = torch.load(result["checkpoint"], weights_only=True)
    resumed_cfg = cfg.copy()
    resumed_cfg.ckpt_path = result["checkpoint"]
    resumed_cfg.trainer.max_steps = 6
    resumed_cfg.run_dir = str(tmp_path)
    resumed = train(resumed_cfg)
    after = torch.load(resumed["checkpoint"], weights_only=True)
    assert resumed["global_step"] == 6
    assert read.count(str(cfg.autoencoder_ckpt)) == 1
    assert int(after["state_dict"]["ema.num_updates"]) == 6  # EMA state came back too
    assert after["ldm"]["latent_scale"] == before["ldm"]["latent_scale"]  # not re-measured
    step_before = before["optimizer_states"][0]["state"][0]["step"]
    assert after["optimizer_states"][0]["state"][0]["step"] == step_before + 2


def test_a_resume_takes_the_optimizer_settings_of_its_config(ldm_run, tmp_path):
    """torch restores the checkpoint's lr, betas and weight decay into the optimizer; the resumed run must use the
    config's instead: here a doubled global batch under linear scaling (lr 2e-3 → 4e-3) and a new weight decay."""
    from ldm.training.run import train

    result, cfg = ldm_run
    before = torch.load(result["checkpoint"], weights_only=True)
    assert [g["initial_lr"] for g in before["optimizer_states"][0]["param_groups"]] == [2e-3, 2e-3]
    resumed_cfg = cfg.copy()
    resumed_cfg.ckpt_path = result["checkpoint"]
    resumed_cfg.trainer.max_steps = 6
    resumed_cfg.run_dir = str(tmp_path)
    resumed_cfg.lr_scaling, resumed_cfg.base_batch_size = "linear", cfg.data.batch_size // 2
    resumed_cfg.optim.weight_decay = 0.05
    after = torch.load(train(resumed_cfg)["checkpoint"], weights_only=True)
    decay, no_decay = after["optimizer_states"][0]["param_groups"]
    step = after["lr_schedulers"][0]["last_epoch"]
    settings = hydra.utils.instantiate(cfg.optim, lr=4e-3)
    assert step == 6 and after["lr_schedulers"][0]["base_lrs"] == [4e-3, 4e-3]
    assert decay["lr"] == no_decay["lr"] == pytest.approx(4e-3 * settings.lr_factor_fn(6)(step))
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)


def test_pipeline_from_checkpoint_is_reproducible(ldm_run):
    from ldm.diffusion import DDIMSampler

    result, _ = ldm_run
    pipe, bundle = TextToImage.from_checkpoint(result["checkpoint"])
    sampler = DDIMSampler(num_steps=3)
    a = pipe(["a red circle on a blue background", "a blue star"], sampler, guidance_scale=3.0, seeds=[7, 8])
    b = pipe(["a blue star"], sampler, guidance_scale=3.0, seeds=[8])
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=0)  # an image depends on its seed, not its batch


def test_weights_snapshots_sample_like_the_full_checkpoint(ldm_run):
    """checkpoints/weights/: the EMA UNet, autoencoder and latent scale (and this random text tower), no optimizer
    or raw weights; the same images as the full checkpoint of that step."""
    from ldm.diffusion import DDIMSampler

    result, _ = ldm_run
    checkpoints = Path(result["run_dir"]) / "checkpoints"
    assert {p.name for p in (checkpoints / "weights").iterdir()} == {"step_0000002.ckpt", "step_0000004.ckpt"}
    snapshot, full = checkpoints / "weights" / "step_0000004.ckpt", checkpoints / "step_0000004.ckpt"
    bundle, snap = load_bundle(snapshot)
    assert bundle["contents"] == "weights_only" and "contents" not in load_bundle(full)[0]
    assert "optimizer_states" not in snap and "callbacks" not in snap
    state, full_state = snap["state_dict"], torch.load(full, weights_only=True)["state_dict"]
    assert state and all(k.startswith(("ema.", "codec.", "text_encoder.")) for k in state)
    assert all(torch.equal(v, full_state[k]) for k, v in state.items())
    unet_bytes = sum(v.nbytes for k, v in full_state.items() if k.startswith("unet."))
    assert full.stat().st_size - snapshot.stat().st_size > 3 * unet_bytes  # no raw UNet, no AdamW moments

    sampler, prompts = DDIMSampler(num_steps=3), ["a red circle on a blue background"]
    images = [
        TextToImage.from_checkpoint(p)[0](prompts, sampler, guidance_scale=3.0, seeds=[3])
        for p in (snapshot, full)
    ]
    assert torch.equal(*images)
    with pytest.raises(ValueError, match="holds the EMA weights only"):
        TextToImage.from_checkpoint(snapshot, use_ema=False)


def test_weights_snapshot_cannot_resume_but_starts_a_run(ldm_run, tmp_path):
    """ckpt_path refuses it (nothing to resume); init_from starts the UNet and its EMA from its EMA weights. The run
    also keeps only the newest 3 full checkpoints (monitor step, save_top_k 3)."""
    from ldm.training.run import train

    result, cfg = ldm_run
    snapshot = Path(result["run_dir"]) / "checkpoints" / "weights" / "step_0000004.ckpt"
    refused = cfg.copy()
    refused.ckpt_path, refused.run_dir = str(snapshot), str(tmp_path / "refused")
    with pytest.raises(ValueError, match="weights-only checkpoint .* init_from="):
        train(refused)

    started = cfg.copy()
    started.init_from, started.run_dir = str(snapshot), str(tmp_path / "started")
    started.trainer.max_steps = 5
    started.callbacks.model_checkpoint.every_n_train_steps = 1
    started.callbacks.weights_snapshot = None
    started.callbacks.sample_grid = None
    seen = {}

    class _AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["unet"] = {k: v.clone() for k, v in pl_module.unet.state_dict().items()}

    train(started, extra_callbacks=[_AtStart()])
    ema = submodule_state(torch.load(snapshot, weights_only=True)["state_dict"], "ema.module")
    assert seen["unet"].keys() == ema.keys() and all(torch.equal(seen["unet"][k], v) for k, v in ema.items())
    names = {p.name for p in (tmp_path / "started" / "checkpoints").iterdir() if p.is_file()}
    assert names == {"step_0000003.ckpt", "step_0000004.ckpt", "step_0000005.ckpt", "last.ckpt"}


def test_negative_prompt_takes_the_place_of_the_empty_prompt(ldm_run):
    """Guidance is out_uncond + s (out_cond - out_uncond), and the negative prompt is the uncond input: at s = 0 a
    prompt with negative prompt N samples what N alone samples without guidance (s = 1)."""
    from ldm.diffusion import DDIMSampler

    pipe, _ = TextToImage.from_checkpoint(ldm_run[0]["checkpoint"])
    sampler, prompt, negative = DDIMSampler(num_steps=3), ["a red circle on a blue background"], "a blue star"
    plain = pipe(prompt, sampler, guidance_scale=3.0, seeds=[5])
    for empty in (None, "", [""]):
        assert torch.equal(pipe(prompt, sampler, guidance_scale=3.0, seeds=[5], negative_prompt=empty), plain)
    steered = pipe(prompt, sampler, guidance_scale=3.0, seeds=[5], negative_prompt=negative)
    assert (steered - plain).abs().max() > 1e-3
    only_negative = pipe(prompt, sampler, guidance_scale=0.0, seeds=[5], negative_prompt=[negative])
    torch.testing.assert_close(
        only_negative, pipe([negative], sampler, guidance_scale=1.0, seeds=[5]), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="got 1 prompts but 2 negative prompts"):
        pipe(prompt, sampler, guidance_scale=3.0, seeds=[5], negative_prompt=["a", "b"])


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
    assert f"{result['checkpoint']}: EMA UNet weights" in proc.stdout
    images = sorted((out / "images").glob("*.png"))
    assert len(images) == 4
    meta = read_png_metadata(images[1])
    assert meta["prompt"] == "a red circle on a blue background" and meta["seed"] == 6
    assert meta["steps"] == 3 and meta["guidance_scale"] == 2.5 and meta["sampler"] == "DDIMSampler"
    assert meta["device"] == "cpu"  # what a stochastic sampler's reproduce= needs alike
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

    # the throughput panels (ThroughputCallback), logged at every step here (log_every_n_steps=1)
    import csv

    (metrics_file,) = tmp_path.glob("**/metrics.csv")
    rows = [r for r in csv.DictReader(metrics_file.open()) if r.get("perf/samples_seen")]
    assert [float(r["perf/samples_seen"]) for r in rows] == [8.0, 16.0]  # batch 8, one process
    for r in rows:
        step_time, images_per_sec = float(r["perf/step_time"]), float(r["perf/images_per_sec"])
        assert step_time > 0 and images_per_sec * step_time == pytest.approx(8.0)
        assert 0.0 <= float(r["perf/data_wait_frac"]) <= 1.0
        assert float(r["perf/tflops_per_device"]) > 0  # FLOPs counted on the first batch


# ---------------------------------------------------------------- sample.py modes (issue 7)


def test_pipeline_rebuilds_the_training_options_from_the_checkpoint(ldm_run):
    pipe, _ = TextToImage.from_checkpoint(ldm_run[0]["checkpoint"])
    d = pipe.diffusion
    assert (d.zero_terminal_snr, d.offset_noise, d.min_snr_gamma) == (True, 0.05, 5.0)
    assert d.alphas_cumprod[-1].item() == 0.0  # the rescaled schedule, not the plain cosine one


def _run_sample(*args, cwd=ROOT):
    proc = subprocess.run(
        [sys.executable, "sample.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_sample_grids_reproduce_and_variations(ldm_run, tmp_path):
    """2×2 grid per prompt with captions; an image rebuilt from its PNG metadata alone (a stochastic sampler,
    batches straddling prompts); variations of a grid cell with new seeds."""
    ckpt = ldm_run[0]["checkpoint"]
    out = tmp_path / "txt2img"
    _run_sample(
        f"ckpt={ckpt}",
        "prompts=[a red circle on a blue background,a blue star]",
        f"out_dir={out}",
        "sampler=euler_ancestral",
        "sampler.num_steps=4",
        "guidance_scale=3.0",
        "guidance_rescale=0.7",
        "negative_prompt=a green square",
        "guidance_interval=[0.5,8]",  # some of the 4 steps guided, not all: reproduce must restore it
        "batch_size=3",
        "seed=11",
    )
    images = sorted((out / "images").glob("*.png"))
    assert len(images) == 8
    grid_meta = read_png_metadata(out / "grids" / "001.png")
    assert grid_meta["prompt"] == "a blue star" and grid_meta["seeds"] == [11, 12, 13, 14]
    assert len(grid_meta["cells"]) == 4 and grid_meta["sampler_config"]["_target_"].endswith(
        "EulerAncestralSampler"
    )
    with Image.open(out / "grids" / "001.png") as grid:
        assert 2 * 32 < grid.width < 3 * 96 and grid.height > grid.width  # 2 columns, 2 rows + 2 captions
    meta = read_png_metadata(images[5])  # prompt 1, seed 12: made in a batch with prompt 0's last image
    assert (
        meta["guidance_rescale"] == 0.7 and meta["batch"]["prompts"][0] == "a red circle on a blue background"
    )
    assert meta["negative_prompt"] == "a green square" and meta["guidance_interval"] == [0.5, 8.0]

    again = tmp_path / "again"
    _run_sample(
        f"reproduce={images[5]}",
        f"out_dir={again}",
        "ckpt=ignored",
        "sampler=ddim",
        "guidance_scale=9",
        "negative_prompt=ignored too",
    )
    np.testing.assert_array_equal(_pixels(again / "reproduced.png"), _pixels(images[5]))

    from ldm.diffusion import DDIMSampler
    from ldm.sampling import prepare_job, write_samples

    pipe, _ = TextToImage.from_checkpoint(ckpt)
    job = prepare_job(pipe, [], mode="variations", variations_of=str(out / "grids" / "001.png"), cell=1)
    write_samples(pipe, job, DDIMSampler(4), tmp_path / "variations", num_per_prompt=2, guidance_scale=3.0)
    var_images = sorted((tmp_path / "variations" / "images").glob("*.png"))
    assert len(var_images) == 2
    vmeta = read_png_metadata(var_images[0])
    assert vmeta["prompt"] == "a blue star" and vmeta["mode"] == "img2img" and vmeta["strength"] == 0.6
    assert vmeta["seed"] == 12 + 1 and vmeta["variation_of"].endswith("001_000012.png")
    assert not np.array_equal(_pixels(var_images[0]), _pixels(var_images[1]))


def test_img2img_inpaint_outpaint(ldm_run, tmp_path):
    from ldm.diffusion import DPMSolverPP2MSampler
    from ldm.sampling import prepare_job, write_samples

    pipe, _ = TextToImage.from_checkpoint(ldm_run[0]["checkpoint"])
    rng = np.random.default_rng(0)
    source = tmp_path / "source.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(source)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    sampler = DPMSolverPP2MSampler(4, karras=True)
    prompts = ["a green square on a white background"]

    def run(name, **kwargs):
        job = prepare_job(pipe, prompts, init_image=str(source), **kwargs)
        write_samples(pipe, job, sampler, tmp_path / name, num_per_prompt=2, guidance_scale=2.0)
        return [_pixels(p) for p in sorted((tmp_path / name / "images").glob("*.png"))]

    original = _pixels(source)
    # (the distance to the source is checked at the sampler level, tests/test_samplers.py: this VAE is untrained)
    low = run("img2img_low", mode="img2img", strength=0.25)
    high = run("img2img_high", mode="img2img", strength=1.0)
    assert low[0].shape == (32, 32, 3) and not np.array_equal(low[0], high[0])
    meta = read_png_metadata(sorted((tmp_path / "img2img_low" / "images").glob("*.png"))[0])
    assert meta["mode"] == "img2img" and meta["strength"] == 0.25 and len(meta["init_image_sha256"]) == 16

    inpainted = run("inpaint", mode="inpaint", mask=str(tmp_path / "mask.png"))
    keep = mask == 0
    for image in inpainted:
        np.testing.assert_array_equal(image[keep], original[keep])  # kept pixels are the source's
        assert np.abs(image[~keep] - original[~keep]).mean() > 10  # the hole is generated
    meta = read_png_metadata(sorted((tmp_path / "inpaint" / "images").glob("*.png"))[0])
    assert meta["mode"] == "inpaint" and meta["mask"].endswith("mask.png") and meta["strength"] == 1.0

    outpainted = run("outpaint", mode="outpaint", outpaint={"left": 8, "bottom": 16})
    assert outpainted[0].shape == (48, 40, 3)
    np.testing.assert_array_equal(outpainted[0][:32, 8:], original)
    with pytest.raises(ValueError, match="multiples of 8"):
        prepare_job(pipe, prompts, mode="outpaint", init_image=str(source), outpaint={"left": 4})
    with pytest.raises(ValueError, match="mask needs an init_image"):
        pipe(prompts, sampler, mask=torch.ones(1, 1, 32, 32))


@pytest.fixture(scope="module")
def inpaint_run(vae_run, shards, tmp_path_factory):
    from ldm.training.run import train

    cfg = compose_train(
        "experiment=inpaint_tiny",
        f"data.train_urls={shards[0]}",
        f"autoencoder_ckpt={vae_run[0]['checkpoint']}",
        "trainer.max_steps=3",
        "sampler.num_steps=3",
        "callbacks.sample_grid.every_n_steps=3",  # txt2img with an inpainting UNet: everything masked
        *FAST,
        run_dir=str(tmp_path_factory.mktemp("inpaint")),
    )
    return train(cfg), cfg


def test_inpainting_unet_trains_and_samples(inpaint_run, tmp_path):
    """experiment=inpaint_tiny: a 2 C + 1 input UNet, rebuilt from its checkpoint; inpaint and outpaint feed it
    the mask and kept latents (no per-step replacement), and the kept pixels come back exactly."""
    from ldm.diffusion import DDIMSampler
    from ldm.inference import is_inpainting_unet
    from ldm.sampling import prepare_job, write_samples

    result, _ = inpaint_run
    assert result["global_step"] == 3
    pipe, bundle = TextToImage.from_checkpoint(result["checkpoint"])
    assert is_inpainting_unet(pipe.unet) and pipe.unet.in_channels == 9 and pipe.unet.out_channels == 4
    assert bundle["config"]["stage"]["inpainting_masks"]["border"] == 0.2

    rng = np.random.default_rng(1)
    source = tmp_path / "source.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(source)
    original = _pixels(source)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    prompts = ["a red circle on a blue background"]

    def run(name, **kwargs):
        job = prepare_job(pipe, prompts, init_image=str(source), **kwargs)
        write_samples(pipe, job, DDIMSampler(3), tmp_path / name, num_per_prompt=2, guidance_scale=2.0)
        return [_pixels(p) for p in sorted((tmp_path / name / "images").glob("*.png"))]

    inpainted = run("inpaint", mode="inpaint", mask=str(tmp_path / "mask.png"))
    for image in inpainted:
        np.testing.assert_array_equal(image[:, :16], original[:, :16])
        assert np.abs(image[:, 16:] - original[:, 16:]).mean() > 10
    outpainted = run("outpaint", mode="outpaint", outpaint={"right": 16})
    assert outpainted[0].shape == (32, 48, 3)
    np.testing.assert_array_equal(outpainted[0][:, :32], original)
    txt2img = pipe(prompts, DDIMSampler(3), guidance_scale=2.0, seeds=[0])
    assert txt2img.shape == (1, 3, 32, 32) and torch.isfinite(txt2img).all()


def test_inpainting_unet_starts_from_a_text_to_image_checkpoint(ldm_run, vae_run, shards):
    """init_from a plain stage-2 checkpoint into an inpainting UNet: the input convolution gains zero weights for
    the mask and masked latents, so the new network computes exactly what the old one did, whatever they hold."""
    from ldm.training.init_from import load_init_weights
    from ldm.training.run import _adopt_autoencoder_config, _init_checkpoint, build_module

    ckpt = ldm_run[0]["checkpoint"]
    cfg = compose_train(
        "experiment=inpaint_tiny",
        f"data.train_urls={shards[0]}",
        f"autoencoder_ckpt={vae_run[0]['checkpoint']}",
        f"init_from={ckpt}",
        *FAST,
    )
    init = _init_checkpoint(cfg)
    _adopt_autoencoder_config(cfg)
    module = build_module(cfg)
    load_init_weights(module, init, ckpt)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    extra = torch.randn(2, 5, 8, 8)
    for unet, use_ema in ((module.ema.module, True), (module.unet, False)):
        plain, _ = TextToImage.from_checkpoint(ckpt, use_ema=use_ema)
        cond = plain.text_encoder(["a red circle", "a blue star"])
        assert unet.in_channels == 9 and plain.unet.in_channels == 4
        torch.testing.assert_close(  # pooled: used by UNets built with pooled_dim (experiment=tiny), else ignored
            unet(torch.cat([x, extra], 1), t, cond.tokens, pooled=cond.pooled),
            plain.unet(x, t, cond.tokens, pooled=cond.pooled),
        )
    weight = module.unet.input_blocks[0][0].weight
    assert (weight[:, 4:] == 0).all() and (weight[:, :4] != 0).any()


def test_sample_cli_compares_several_checkpoints(ldm_run, tmp_path):
    """ckpt=<glob>: the weights snapshots of steps 2 and 4, each sampled into out_dir/<name>/ with the same prompts
    and seeds, and compare.png with a labelled row per checkpoint made of exactly those images."""
    result, _ = ldm_run
    weights = Path(result["run_dir"]) / "checkpoints" / "weights"
    out = tmp_path / "cmp"
    stdout = _run_sample(
        f"ckpt={weights}/step_*.ckpt",
        "prompts=[a red circle on a blue background,a green square on a white background]",
        "num_per_prompt=2",
        "sampler.num_steps=2",
        f"out_dir={out}",
    )
    assert "comparison of 2 checkpoints written to" in stdout
    names = ["step_0000002", "step_0000004"]
    rows = [sorted((out / n / "images").glob("*.png")) for n in names]
    assert [[p.name for p in row] for row in rows] == [
        ["000_000000.png", "000_000001.png", "001_000000.png", "001_000001.png"]
    ] * 2
    assert read_png_metadata(rows[1][0])["checkpoint"] == str(weights / "step_0000004.ckpt")
    assert not np.array_equal(_pixels(rows[0][0]), _pixels(rows[1][0]))  # two steps apart: other weights
    compare = _pixels(out / "compare.png")
    meta = read_png_metadata(out / "compare.png")
    assert meta["rows"] == names and meta["cells"] == [p.name for p in rows[0]]
    # each row's tiles are that checkpoint's images, upscaled 3× (nearest) into 96-px cells, 2 px apart
    row_height = (compare.shape[0] - 2) // 2
    for r, row in enumerate(rows):
        for c, path in enumerate(row):
            tile = np.repeat(np.repeat(_pixels(path), 3, axis=0), 3, axis=1)
            y, x = 2 + r * row_height, 2 + c * 98
            np.testing.assert_array_equal(compare[y : y + 96, x : x + 96], tile)
