"""Progressive resolution and non-square training/sampling, end to end on tiny configs: a 32-px stage-2 run on
aspect-ratio buckets, continued at 64 px with `init_from` and a shifted schedule; sample.py at a bucket size."""

import math
import random
import subprocess
import sys

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from ldm.diffusion import GaussianDiffusion
from ldm.diffusion.schedules import make_betas, rescale_zero_terminal_snr, shift_schedule
from ldm.inference import TextToImage
from ldm.utils.checkpoint import load_bundle, submodule_state

from .helpers import ROOT, compose_train
from .test_buckets import write_mixed_shards

# ---------------------------------------------------------------- the schedule shift


@pytest.mark.parametrize(
    "schedule,zero_terminal", [("cosine", False), ("scaled_linear", False), ("cosine", True)]
)
@pytest.mark.parametrize("shift", [2.0, 4.0, 0.5])
def test_schedule_shift_lowers_log_snr_by_2_log_shift(schedule, zero_terminal, shift):
    betas = make_betas(schedule, 1000)
    if zero_terminal:
        betas = rescale_zero_terminal_snr(betas)
    shifted = shift_schedule(betas, shift)
    ab, ab_shifted = torch.cumprod(1 - betas, 0), torch.cumprod(1 - shifted, 0)
    inside = (ab > 0) & (ab < 1)
    log_snr = torch.log(ab[inside]) - torch.log1p(-ab[inside])
    log_snr_shifted = torch.log(ab_shifted[inside]) - torch.log1p(-ab_shifted[inside])
    torch.testing.assert_close(log_snr_shifted - log_snr, torch.full_like(log_snr, -2 * math.log(shift)))
    assert ((shifted > 0) & (shifted <= 1)).all()
    if zero_terminal:
        assert ab_shifted[-1] == 0  # zero terminal SNR is kept
    assert torch.equal(shift_schedule(betas, 1.0), betas)


def test_shift_in_the_diffusion_and_its_description():
    plain = GaussianDiffusion("cosine", prediction="v")
    shifted = GaussianDiffusion("cosine", prediction="v", schedule_shift=2.0)
    t = torch.arange(0, 1000, 50)
    torch.testing.assert_close(shifted.snr(t), plain.snr(t) / 4, rtol=1e-5, atol=0)
    assert shifted.describe()["schedule_shift"] == 2.0
    assert (
        "schedule_shift" not in plain.describe()
    )  # checkpoints without a shift describe themselves as before
    with pytest.raises(ValueError, match="shift must be > 0"):
        GaussianDiffusion(schedule_shift=0.0)


def test_laion_512_and_1024_extend_the_256_recipe():
    base = compose_train("experiment=laion_256")
    for name, resolution, shift in (("laion_512", 512, 2.0), ("laion_1024", 1024, 4.0)):
        cfg = compose_train(f"experiment={name}", "init_from=/ckpt/last.ckpt")
        assert cfg.name == name and cfg.init_from == "/ckpt/last.ckpt"
        assert cfg.data.resolution == resolution and cfg.diffusion.schedule_shift == shift
        assert cfg.unet == base.unet and cfg.text_encoder == base.text_encoder  # same networks as at 256
        assert cfg.diffusion.schedule == base.diffusion.schedule and cfg.stage == base.stage
        assert cfg.optim.lr == base.optim.lr and cfg.trainer.strategy == "ddp"
    assert compose_train("experiment=laion_256").init_from is None


# ---------------------------------------------------------------- end to end


class _Record(L.Callback):
    """What the training loop sees: batch image sizes, and the weights before the first step."""

    def __init__(self):
        self.sizes, self.micro, self.start = [], [], None

    def on_train_start(self, trainer, pl_module):
        self.start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append(tuple(batch["image"].shape[-2:]))
        f = pl_module.codec.autoencoder.downsample_factor
        latents = batch["image"][:, :, ::f, ::f]  # the latent grid's shape is all the module looks at
        self.micro.append((batch.get("original_size"), pl_module._micro_conditioning(batch, latents)))


COMMON = [
    "logger=csv",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
    "data.batch_size=4",
    "trainer.log_every_n_steps=1",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-step stage-1 run, a 2-step bucketed stage-2 run at 32 px, and a 2-step 64-px run from its weights."""
    from ldm.training.run import train

    shards = tmp_path_factory.mktemp("progressive-shards")
    rng = random.Random(0)
    sizes = {f"{i:09d}": rng.choice([(48, 48), (64, 40), (40, 64), (72, 40)]) for i in range(32)}
    write_mixed_shards(shards, 2, 16, sizes)
    vae = train(
        compose_train(
            "experiment=vae_tiny",
            f"data.train_urls={shards}",
            "trainer.max_steps=1",
            "stage.latent_stats_samples=8",
            *COMMON,
            run_dir=str(tmp_path_factory.mktemp("vae")),
        )
    )
    record32 = _Record()
    low = train(
        compose_train(
            "experiment=tiny",
            f"data.train_urls={shards}",
            f"autoencoder_ckpt={vae['checkpoint']}",
            "data.buckets={step: 8, max_ratio: 2}",  # f4 autoencoder × 2 UNet levels = 8 px
            "unet.micro_conditioning=true",  # on the batches' original size, crop and bucket
            "trainer.max_steps=2",
            "callbacks.sample_grid=null",
            *COMMON,
            run_dir=str(tmp_path_factory.mktemp("ldm32")),
        ),
        extra_callbacks=[record32],
    )
    record64 = _Record()
    high = train(
        compose_train(
            "experiment=tiny",
            f"data.train_urls={shards}",
            f"init_from={low['checkpoint']}",  # autoencoder_ckpt comes from it
            "data.resolution=64",
            "diffusion.schedule_shift=2.0",
            "unet.micro_conditioning=true",  # square data: an uncropped image of the training size
            "trainer.max_steps=2",
            "callbacks.sample_grid=null",
            *COMMON,
            run_dir=str(tmp_path_factory.mktemp("ldm64")),
        ),
        extra_callbacks=[record64],
    )
    return {"vae": vae, "low": low, "high": high, "record32": record32, "record64": record64}


@pytest.mark.slow  # shares the module's three training runs (~15 s on 2 idle cores)
def test_bucketed_training_sees_non_square_batches(runs):
    sizes = runs["record32"].sizes
    assert len(sizes) == 2 and all(s in [(40, 24), (32, 32), (24, 40)] for s in sizes)
    assert any(h != w for h, w in sizes)
    assert torch.isfinite(torch.tensor(runs["low"]["metrics"]["train/loss"]))
    for (original, micro), (h, w) in zip(runs["record32"].micro, sizes, strict=True):
        assert micro[:, :2].tolist() == original.tolist()  # the sizes the data carries
        assert (micro[:, 4:] == torch.tensor([h, w])).all()
        assert ((micro[:, 2:4] >= 0) & (micro[:, 2:4] < 8)).all()  # a minimal crop: less than one bucket step
    assert not runs["record32"].start["unet.micro_proj.weight"].any()  # zero-initialised


@pytest.mark.slow  # shares the module's three training runs (~15 s on 2 idle cores)
def test_init_from_loads_the_weights_and_starts_at_step_zero(runs):
    _, low = load_bundle(runs["low"]["checkpoint"])
    start = runs["record64"].start
    for prefix in ("unet.", "ema.module.", "codec.scale"):
        keys = [k for k in low["state_dict"] if k.startswith(prefix)]
        assert keys
        for k in keys:
            assert torch.equal(start[k], low["state_dict"][k]), k
    assert int(start["ema.num_updates"]) == 2  # the EMA carries on
    bundle, high = load_bundle(runs["high"]["checkpoint"])
    assert runs["high"]["global_step"] == 2 and high["global_step"] == 2  # not 4: a new run
    assert high["optimizer_states"][0]["state"][0]["step"] == 2  # a fresh optimizer
    assert runs["record64"].sizes == [(64, 64), (64, 64)]
    for original, micro in runs["record64"].micro:  # no buckets: an uncropped image of the training size
        assert original is None and micro.tolist() == [[64, 64, 0, 0, 64, 64]] * 4
    assert bundle["diffusion"]["schedule_shift"] == 2.0
    assert bundle["config"]["init_from"] == runs["low"]["checkpoint"]
    assert bundle["config"]["autoencoder_ckpt"] == runs["vae"]["checkpoint"]
    diffusion = instantiate(bundle["config"]["diffusion"])  # what sample.py rebuilds
    expected = shift_schedule(make_betas("cosine", 1000), 2.0)
    torch.testing.assert_close(diffusion.betas, expected)


@pytest.mark.slow  # shares the module's three training runs (~15 s on 2 idle cores)
def test_init_from_refuses_another_stage(runs, tmp_path):
    from ldm.training.run import train

    cfg = compose_train(
        "experiment=tiny", f"init_from={runs['vae']['checkpoint']}", *COMMON, run_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match="is a 'autoencoder' checkpoint; this run is 'diffusion'"):
        train(cfg)


@pytest.mark.slow  # shares the module's three training runs (~15 s on 2 idle cores)
def test_bucket_step_must_fit_the_downsampling(runs, tmp_path):
    from ldm.training.run import train

    cfg = compose_train(
        "experiment=tiny",
        f"autoencoder_ckpt={runs['vae']['checkpoint']}",
        "data.buckets={step: 4}",
        *COMMON,
        run_dir=str(tmp_path),
    )
    with pytest.raises(ValueError, match="not multiples of 8"):
        train(cfg)


@pytest.mark.slow  # shares the module's three training runs (~15 s on 2 idle cores)
def test_sampling_at_a_bucket_size(runs, tmp_path):
    ckpt = runs["low"]["checkpoint"]
    out = tmp_path / "samples"
    cmd = [
        sys.executable,
        "sample.py",
        f"ckpt={ckpt}",
        "prompts=[a wide picture]",
        f"out_dir={out}",
        "sampler.num_steps=2",
        "num_per_prompt=1",
        "height=24",
        "width=40",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (image,) = sorted((out / "images").glob("*.png"))
    assert Image.open(image).size == (40, 24)
    pipe, _ = TextToImage.from_checkpoint(ckpt)
    from ldm.diffusion import DDIMSampler

    tall = pipe(["a tall picture"], DDIMSampler(num_steps=2), seeds=[0], height=40, width=24)
    assert tall.shape == (1, 3, 40, 24)
    with pytest.raises(ValueError, match=r"multiples of 8 \(autoencoder factor 4 × UNet downsampling 2\)"):
        pipe(["x"], DDIMSampler(num_steps=2), height=20, width=40)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(submodule_state(state, "ema.module")["out.2.weight"], pipe.unet.out[2].weight)
