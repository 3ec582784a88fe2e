"""Autoguidance (Karras et al. 2024): a weaker checkpoint of the same model guides instead of the empty prompt.

The formula and the interval on toy denoisers; then a real 4-step stage-2 run whose step-2 weights snapshot is the
guide: the pipeline, the refusals of guides from another latent space, text encoder or diffusion, sample.py with
reproduce, and eval's protocol record."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.diffusion import autoguidance
from ldm.inference import TextToImage
from ldm.utils.checkpoint import BUNDLE_KEY, atomic_save, load_bundle
from ldm.utils.images import read_png_metadata

from .helpers import FAST, ROOT, compose_train

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


# --- the formula ---------------------------------------------------------------------------------------------
def test_guided_output_is_guide_plus_scale_times_the_difference():
    calls = {"model": 0, "guide": 0}

    def model(x, t, cond):
        calls["model"] += 1
        return 2 * x + cond

    def guide(x, t, cond):
        calls["guide"] += 1
        return x - cond

    x, t, cond = torch.randn(3, 4), torch.full((3,), 500), torch.randn(3, 4)
    out = autoguidance(model, guide, cond, 2.5)(x, t)
    torch.testing.assert_close(out, (x - cond) + 2.5 * ((2 * x + cond) - (x - cond)), rtol=0, atol=0)
    assert calls == {"model": 1, "guide": 1}
    torch.testing.assert_close(
        autoguidance(model, guide, cond, 1.0)(x, t), 2 * x + cond
    )  # scale 1: the model
    assert calls == {"model": 2, "guide": 1}
    # outside the interval: the model alone, one call; inside: guided
    sigma_at = lambda t: t.float() / 100  # noqa: E731
    banded = autoguidance(model, guide, cond, 2.5, interval=(0.0, 1.0), sigma_at=sigma_at)
    torch.testing.assert_close(banded(x, t), 2 * x + cond)
    assert calls == {"model": 3, "guide": 1}
    torch.testing.assert_close(banded(x, torch.full((3,), 50)), out)
    with pytest.raises(ValueError, match="rescale"):
        autoguidance(model, guide, cond, 2.5, rescale=2.0)


# --- a real model and an earlier snapshot of it -------------------------------------------------------------
@pytest.fixture(scope="module")
def run(synthetic_shards, vae_ckpt, tmp_path_factory):
    """4 steps of experiment=tiny; weights snapshots every 2 steps: the step-2 one is the weaker guide."""
    from ldm.training.run import train

    run_dir = tmp_path_factory.mktemp("autoguide")
    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={synthetic_shards[0]}",
        f"autoencoder_ckpt={vae_ckpt}",
        "trainer.max_steps=4",
        "logger=csv",
        "callbacks.sample_grid=null",
        "callbacks.weights_snapshot.every_n_train_steps=2",
        *FAST,
        run_dir=str(run_dir),
    )
    result = train(cfg)
    snapshots = sorted((Path(result["checkpoint"]).parent / "weights").glob("*.ckpt"))
    assert len(snapshots) == 2, snapshots
    return {"last": result["checkpoint"], "guide": str(snapshots[0]), "dir": run_dir}


def _sample(pipe, scale, **kwargs):
    from ldm.diffusion import DDIMSampler

    return pipe(PROMPTS, DDIMSampler(num_steps=3), guidance_scale=scale, seeds=[0, 1], **kwargs)


def test_guide_identical_to_the_model_leaves_the_conditional_samples(run):
    pipe, _ = TextToImage.from_checkpoint(run["last"])
    unguided = _sample(pipe, 1.0)
    pipe.load_guide(run["last"])
    assert pipe.guide is not pipe.unet and not pipe.guide.training
    torch.testing.assert_close(_sample(pipe, 3.0), unguided, rtol=0, atol=0)  # D + w (D - D) = D


def test_an_earlier_snapshot_guides_unlike_classifier_free_guidance(run):
    pipe, _ = TextToImage.from_checkpoint(run["last"])
    plain, cfg_guided = _sample(pipe, 1.0), _sample(pipe, 3.0)
    pipe.load_guide(run["guide"])
    auto = _sample(pipe, 3.0)
    assert pipe.guide_info["path"] == str(Path(run["guide"]).resolve()) and pipe.guide_info["use_ema"]
    assert (auto - plain).abs().max() > 1e-3 and (auto - cfg_guided).abs().max() > 1e-3
    torch.testing.assert_close(_sample(pipe, 3.0), auto, rtol=0, atol=0)  # deterministic
    with pytest.raises(ValueError, match="negative prompt"):
        _sample(pipe, 3.0, negative_prompt="blurry")


def _altered(path: str, out: Path, change) -> str:
    bundle, ckpt = load_bundle(path)
    change(ckpt)
    atomic_save(ckpt, out)
    return str(out)


def test_guides_from_another_model_family_are_refused(run, tmp_path):
    pipe, _ = TextToImage.from_checkpoint(run["last"])

    def diffusion(ckpt):
        ckpt[BUNDLE_KEY]["config"]["diffusion"]["prediction"] = "eps"

    def latent_scale(ckpt):
        ckpt["state_dict"]["codec.scale"] = ckpt["state_dict"]["codec.scale"] * 2

    def text_encoder(ckpt):
        key = next(k for k in ckpt["state_dict"] if k.startswith("text_encoder.") and k.endswith("weight"))
        ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1

    for change, message in (
        (diffusion, "diffusion"),
        (latent_scale, "latent spaces differ"),
        (text_encoder, "another text encoder"),
    ):
        path = _altered(run["guide"], tmp_path / f"{change.__name__}.ckpt", change)
        with pytest.raises(ValueError, match=message):
            pipe.load_guide(path)
    assert pipe.guide is None  # nothing half-loaded


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.slow
def test_sample_py_records_the_guide_and_reproduces_the_image(run, tmp_path):
    env_args = dict(cwd=ROOT, capture_output=True, text=True, timeout=600)
    common = ["sampler.num_steps=3", "num_per_prompt=2", "batch_size=4", "guidance_scale=3"]
    out = tmp_path / "samples"
    proc = subprocess.run(
        [sys.executable, "sample.py", f"ckpt={run['last']}", f"guide_ckpt={run['guide']}", f"out_dir={out}"]
        + [f"prompts=[{','.join(PROMPTS)}]", *common],
        **env_args,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = sorted((out / "images").glob("*.png"))
    meta = read_png_metadata(images[1])
    assert meta["guide_ckpt"] == run["guide"]
    again = tmp_path / "again"
    proc = subprocess.run(
        [sys.executable, "sample.py", f"reproduce={images[1]}", f"out_dir={again}"], **env_args
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(_pixels(again / "reproduced.png"), _pixels(images[1]))


def test_eval_records_autoguidance_in_the_protocol(run, tmp_path):
    import open_clip

    from eval.runner import EvalSettings, run_evaluation
    from ldm.diffusion import DDIMSampler

    torch.manual_seed(0)
    clip_file = tmp_path / "clip.bin"
    torch.save(open_clip.create_model("ldm-tiny-text").state_dict(), clip_file)
    settings = EvalSettings(
        ckpt=run["last"],
        guide_ckpt=run["guide"],
        prompts=PROMPTS,
        num_images=2,
        batch_size=2,
        clip_model="ldm-tiny-text",
        clip_pretrained=str(clip_file),
        out_dir=str(tmp_path / "eval"),
        progress=False,
    )
    (result,) = run_evaluation(settings, DDIMSampler(num_steps=2))
    assert result["protocol"]["guidance"] == "autoguidance"
    assert result["protocol"]["guide"]["path"] == str(Path(run["guide"]).resolve())
    assert 0 <= result["metrics"]["clip_score"] <= 100
