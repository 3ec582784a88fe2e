"""Evaluation: FID/KID/IS against cached reference statistics, CLIP score, the CLIs, 2 processes, the callback.

No weights can be downloaded here: the FID Inception (the real torch-fidelity architecture) and a small OpenCLIP
model get random weights, saved to local files and loaded through the real paths. The numbers mean nothing; the
plumbing, the protocol record and the math (against numpy/scipy) are what is checked.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import scipy.linalg
import torch
from PIL import Image

from eval.clip_score import ClipScore, create_clip_model
from eval.dinov2 import save_random_dinov2_weights
from eval.distributed import IndexedFeatures
from eval.features import (
    INCEPTION_FILE,
    INCEPTION_URL,
    InceptionFeatures,
    save_random_inception_weights,
)
from eval.fid import frechet_metric
from eval.generate import load_captions, plan_batches
from eval.reference import ReferenceStats, load_reference, moments, reference_stats, save_reference
from ldm.data.synthetic import write_synthetic_shards
from ldm.utils.weights import MissingWeightsError

from .helpers import FAST as HELPER_FAST
from .helpers import ROOT, compose_train

TINY_CLIP = "ldm-tiny-text"  # ldm's small open_clip config: a 1-layer ViT (32 px) + a 3-layer text tower
PROMPTS = [
    "a red circle on a blue background",
    "a green square on a white background",
    "a blue star on a yellow background",
]
FAST = [*HELPER_FAST, "sampler.num_steps=3"]


# --- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random FID Inception and tiny CLIP weights in local files, plus a shared reference-statistics cache."""
    root = tmp_path_factory.mktemp("weights")
    inception = save_random_inception_weights(root / "inception_random.pth", seed=0)
    dinov2 = save_random_dinov2_weights(root / "dinov2_random.pth", embed_dim=128, depth=2, seed=0)
    torch.manual_seed(0)
    clip_file = root / "tiny_clip.bin"
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), clip_file)
    return {
        "inception": str(inception),
        "dinov2": str(dinov2),
        "clip": str(clip_file),
        "cache": str(root / "fid_cache"),
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return write_synthetic_shards(out, num_samples=48, samples_per_shard=24, resolution=32, seed=0)


@pytest.fixture(scope="module")
def trained(shards, weights, tmp_path_factory):
    """Stage 1 (3 steps) and stage 2 (4 steps) with the eval callback at step 3 (CSV logger)."""
    from ldm.training.run import train

    vae_cfg = compose_train(
        "experiment=vae_tiny",
        f"data.train_urls={shards[0]}",
        "trainer.max_steps=3",
        "stage.latent_stats_samples=16",
        "logger=csv",
        *FAST,
        run_dir=str(tmp_path_factory.mktemp("vae")),
    )
    vae = train(vae_cfg)
    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={shards[0]}",
        f"autoencoder_ckpt={vae['checkpoint']}",
        "trainer.max_steps=4",
        "logger=csv",
        "callbacks.sample_grid=null",
        "stage.posthoc_ema=[0.05,0.1]",  # snapshots at steps 2 and 4: post-hoc EMA checkpoints to compare
        "callbacks.posthoc_ema.every_n_steps=2",
        "callbacks.eval.every_n_steps=3",
        f"callbacks.eval.prompts=[{','.join(PROMPTS)}]",
        f"callbacks.eval.reference={shards[1]}",
        "callbacks.eval.num_images=6",
        "callbacks.eval.batch_size=6",
        "callbacks.eval.reference_num_images=12",
        f"callbacks.eval.reference_cache_dir={weights['cache']}",
        f"callbacks.eval.inception_weights={weights['inception']}",
        "callbacks.eval.fd_dinov2=true",
        f"callbacks.eval.dinov2_weights={weights['dinov2']}",
        f"callbacks.eval.clip_model={TINY_CLIP}",
        f"callbacks.eval.clip_pretrained={weights['clip']}",
        *FAST,
        run_dir=str(tmp_path_factory.mktemp("ldm")),
    )
    return train(cfg)


def numpy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """The reference computation of pytorch-fid / TTUR: scipy's sqrtm of Σ1 Σ2, float64 throughout."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)  # (scipy 1.18 removed the `disp` argument)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def run_cli(args: list[str], launcher: list[str] | None = None, timeout: int = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [*(launcher or [sys.executable]), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-12000:]
    return proc.stdout


# --- Inception: offline weights, torchmetrics-compatible features --------------------------------------------
def test_missing_inception_weights_name_file_url_and_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingWeightsError) as err:
        InceptionFeatures()
    message = str(err.value)
    assert INCEPTION_FILE in message and INCEPTION_URL in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message and "inception_weights=" in message
    with pytest.raises(MissingWeightsError, match="inception_weights=/nowhere/x.pth does not exist"):
        InceptionFeatures("/nowhere/x.pth")


def test_inception_from_hub_cache_matches_torchmetrics(monkeypatch, tmp_path, weights):
    from torchmetrics.image.fid import NoTrainInceptionV3

    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    shutil.copy(weights["inception"], hub / INCEPTION_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ours = InceptionFeatures()  # found in the hub cache
    assert ours.identity()["weights_file"] == INCEPTION_FILE and not ours.identity()["official_weights"]
    images = torch.randint(0, 256, (2, 3, 40, 24), dtype=torch.uint8)
    out = ours(images)
    tm = NoTrainInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], str(hub / INCEPTION_FILE), antialias=False
    )
    pool, logits = tm._torch_fidelity_forward(images)
    torch.testing.assert_close(out.pool, pool, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-5)
    assert out.pool.std() > 1e-2  # He-initialised random weights: features of a usable scale
    clean = InceptionFeatures(weights["inception"], resize="clean")(images)
    assert clean.pool.shape == (2, 2048) and not torch.allclose(clean.pool, pool, atol=1e-3)


# --- the math ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dim", "n_ref", "n_gen"), [(64, 400, 300), (256, 40, 24)])
def test_fid_matches_numpy_scipy(dim, n_ref, n_gen):
    """Well-conditioned, and rank-deficient (fewer samples than dimensions, as with small eval sets)."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(dim, dim)) / dim**0.5
    real = (rng.normal(size=(n_ref, dim)) @ mix).astype(np.float32)
    fake = (rng.normal(size=(n_gen, dim)) @ (mix * 1.3) + 0.2).astype(np.float32)
    mu, sigma = moments(real)
    for ref in (
        ReferenceStats(mu, sigma, n_ref, real),
        ReferenceStats(mu, sigma, n_ref),
    ):  # features / moments
        fid = frechet_metric(ref)
        for chunk in np.array_split(fake, 3):
            fid.update(torch.from_numpy(chunk).double(), real=False)
        ours = fid.compute()
        assert ours.dtype == torch.float64
        expected = numpy_fid(real.astype(np.float64), fake.astype(np.float64))
        assert float(ours) == pytest.approx(expected, rel=1e-6)


def test_features_are_put_back_in_image_order():
    """KID subsets and IS splits depend on sample order; gathered features are sorted by image index, so they
    do not depend on which process made which image (the 2-process CLI test checks the whole path)."""
    rng = np.random.default_rng(1)
    pool, logits = torch.randn(10, 2048), torch.randn(10, 1008)
    metric = IndexedFeatures()
    for idx in np.array_split(rng.permutation(10), 3):
        metric.update(torch.as_tensor(idx), pool[idx], logits[idx])
    index, got_pool, got_logits = metric.compute()
    assert index.tolist() == list(range(10))
    assert torch.equal(got_pool, pool) and torch.equal(got_logits, logits)
    without_logits = IndexedFeatures()  # DINOv2 features come without logits
    without_logits.update(torch.tensor([1, 0]), pool[[1, 0]])
    _, got_pool, got_logits = without_logits.compute()
    assert torch.equal(got_pool, pool[:2]) and got_logits.shape == (2, 0)


def test_plan_is_independent_of_world_size():
    captions = ["a", "b", "c"]
    single = plan_batches(10, captions, seed=5, batch_size=4)
    split = [b for r in range(2) for b in plan_batches(10, captions, 5, 4, rank=r, world_size=2)]
    assert sorted(split, key=lambda b: b.indices[0]) == single
    assert single[1].captions == ["b", "c", "a", "b"] and single[1].seeds == [9, 10, 11, 12]
    with pytest.raises(ValueError, match="lower batch_size"):
        plan_batches(4, captions, 0, 4, rank=0, world_size=2)


def test_collective_generation_calls_equally_often_on_every_rank():
    """5 batches over 2 ranks: 3 and 2. Under strategy=fsdp a UNet forward is a collective, so rank 1 makes a
    throwaway batch rather than leave rank 0's third batch waiting; its scores still count its 2 batches only."""
    from eval.distributed import DistContext
    from eval.generate import Captions
    from eval.runner import Evaluator

    class Scored:  # a CLIP-score stand-in that records what it was given
        def reset(self):
            self.seen = []

        def update(self, images, captions):
            self.seen += captions

        def compute(self):
            return torch.tensor(len(self.seen))

    captions = Captions(["a", "b"], "test")
    for rank, expected in ((0, [3, 3]), (1, [2, 3])):
        counts = []
        for collective in (False, True):
            calls, scorer = [], Scored()
            evaluator = Evaluator(None, scorer, DistContext(rank=rank, world_size=2))
            metrics, _ = evaluator.evaluate(
                lambda prompts, seeds, calls=calls: calls.append(seeds) or torch.zeros(len(seeds), 3, 8, 8),
                captions,
                num_images=10,
                batch_size=2,
                collective=collective,
            )
            counts.append(len(calls))
            assert metrics["clip_score"] == 2 * expected[0], "only the rank's own batches are scored"
        assert counts == expected, rank


# --- reference statistics ------------------------------------------------------------------------------------
def test_reference_stats_are_cached_and_keyed(shards, weights, tmp_path, monkeypatch):
    import eval.reference as reference

    extractor = InceptionFeatures(weights["inception"])
    stats = reference_stats(shards[1], 32, 8, extractor, cache_dir=tmp_path)
    files = list(tmp_path.glob("fid_reference_*.npz"))
    assert len(files) == 1 and stats.num_images == 8 and stats.features.shape == (8, 2048)
    assert stats.info["resolution"] == 32 and stats.info["feature_extractor"]["resize"] == "torch-fidelity"
    np.testing.assert_allclose(stats.sigma, np.cov(stats.features.astype(np.float64), rowvar=False))

    def no_compute(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(reference, "compute_reference", no_compute)
    again = reference_stats(shards[1], 32, 8, extractor, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.mu, stats.mu)
    assert again.info["cache_file"] == str(files[0])
    with pytest.raises(AssertionError, match="recomputed"):  # another protocol is another key
        reference_stats(shards[1], 32, 8, InceptionFeatures(weights["inception"], "clean"), tmp_path)
    # a moments-only file (pytorch-fid layout + a count) is accepted; KID is then unavailable
    np.savez(tmp_path / "published.npz", mu=stats.mu, sigma=stats.sigma, num_images=8)
    published = reference_stats(str(tmp_path / "published.npz"), 32, 8, extractor)
    assert published.features is None and published.num_images == 8
    save_reference(published, tmp_path / "copy.npz")
    np.testing.assert_array_equal(load_reference(tmp_path / "copy.npz").sigma, stats.sigma)


def test_reference_of_cached_latents_is_the_images_they_were_made_from(shards, weights, tmp_path):
    """`data=latents` runs point the eval reference at held-out cached latents by default (`data.val_urls`); they
    hold no images, so the statistics come from the image shards named in their cache_info.json."""
    from ldm.latent_cache import cache_info, cache_latents
    from ldm.models import KLAutoencoder

    arch = {
        "base_channels": 16,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "latent_channels": 4,
        "num_groups": 8,
    }
    torch.manual_seed(0)
    autoencoder = KLAutoencoder(**arch)
    info = cache_info(
        "random-vae.ckpt", {"config": {"autoencoder": arch}}, 32, "center", None, shards[1], autoencoder
    )
    cache = tmp_path / "val-latents"
    cache_latents(autoencoder, shards[1], cache, 32, num_workers=0, info=info, progress=False)

    extractor = InceptionFeatures(weights["inception"])
    from_cache = reference_stats(str(cache), 32, 8, extractor, cache_dir=tmp_path / "a")
    from_images = reference_stats(shards[1], 32, 8, extractor, cache_dir=tmp_path / "b")
    assert from_cache.num_images == 8 and from_cache.info["urls"] == [shards[1]]
    np.testing.assert_array_equal(from_cache.features, from_images.features)


def test_reference_images_real_photos_in_order_and_split(tmp_path):
    """Real photos (skimage ships them) of several sizes and aspect ratios: centre-cropped to the resolution, in
    shard order, and two processes together decode exactly the images one process does."""
    import io

    import webdataset as wds
    from skimage import data

    from eval.reference import reference_images

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    with wds.TarWriter(str(tmp_path / "photos-000000.tar")) as sink:
        for i, photo in enumerate(photos):
            buf = io.BytesIO()
            Image.fromarray(photo).save(buf, format="JPEG", quality=95)
            sink.write({"__key__": f"{i:04d}", "jpg": buf.getvalue(), "txt": f"photo {i}"})
    urls = [str(tmp_path / "photos-000000.tar")]
    one = list(reference_images(urls, 64, num_images=3))
    assert [i for i, _ in one] == [0, 1, 2]  # the first 3, in order
    assert all(x.shape == (3, 64, 64) and x.dtype == torch.uint8 and x.float().std() > 10 for _, x in one)
    two = sorted(item for rank in range(2) for item in reference_images(urls, 64, 3, rank, 2))
    assert [i for i, _ in two] == [0, 1, 2]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(one, two, strict=True))


# --- CLIP score ----------------------------------------------------------------------------------------------
def test_clip_score_matches_open_clip_and_loads_offline(weights, tmp_path):
    metric = ClipScore(TINY_CLIP, weights["clip"])
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    captions = [PROMPTS[i % 3] for i in range(4)]
    # independent: open_clip's own PIL eval transform and encoders
    model = create_clip_model(TINY_CLIP, weights["clip"])
    preprocess = open_clip.image_transform(32, is_train=False)
    pil = torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])
    with torch.no_grad():
        img = model.encode_image(pil, normalize=True)
        txt = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(captions), normalize=True)
    expected = 100 * (img * txt).sum(-1).clamp_min(0)
    torch.testing.assert_close(metric.scores(images, captions).float(), expected, atol=1e-3, rtol=1e-4)
    # two halves (as two processes would) reduce to the mean over all
    a, b = ClipScore(TINY_CLIP, weights["clip"]), metric
    a.update(images[:1], captions[:1])
    b.update(images[1:], captions[1:])
    a.merge_state(b)
    assert float(a.compute()) == pytest.approx(float(expected.mean()), abs=1e-3)
    # local-dir: open_clip_config.json + weights
    folder = tmp_path / "clip_dir"
    folder.mkdir()
    config = json.loads((ROOT / "ldm" / "conditioning" / "model_configs" / f"{TINY_CLIP}.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    shutil.copy(weights["clip"], folder / "open_clip_pytorch_model.bin")
    from_dir = ClipScore(f"local-dir:{folder}", None)
    torch.testing.assert_close(from_dir.scores(images, captions), metric.scores(images, captions))


def test_clip_weights_missing_offline_name_the_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as err:
        create_clip_model("ViT-L-14-quickgelu", "openai", cache_dir="/nonexistent/hf")
    message = str(err.value)
    assert "open_clip_pytorch_model.bin" in message or "open_clip_model.safetensors" in message
    assert "timm/vit_large_patch14_clip_224.openai" in message and "clip_pretrained=" in message
    with pytest.raises(MissingWeightsError, match="known tags"):
        create_clip_model("ViT-L-14-quickgelu", "no-such-tag")


# --- captions ------------------------------------------------------------------------------------------------
def test_captions_from_file_list_and_shards(shards, tmp_path):
    file = tmp_path / "captions.txt"
    file.write_text("# a comment\na red circle\n\na blue star\n")
    assert load_captions(str(file)).texts == ["a red circle", "a blue star"]
    assert load_captions(["x", "y"]).texts == ["x", "y"]
    from_shards = load_captions(captions_from=shards[0], limit=5)
    assert len(from_shards.texts) == 5 and all(from_shards.texts)
    assert (
        from_shards.describe()["sha256"]
        == load_captions(captions_from=shards[0], limit=5).describe()["sha256"]
    )
    with pytest.raises(ValueError, match="no captions"):
        load_captions(None)


# --- end to end: the callback during training, the CLIs, 2 processes ----------------------------------------
def test_callback_logs_fid_and_clip_against_step(trained):
    metrics_csv = next(Path(trained["run_dir"]).glob("csv/**/metrics.csv"))
    rows = list(csv.DictReader(metrics_csv.read_text().splitlines()))
    logged = [r for r in rows if r.get("eval/fid")]
    assert [int(r["step"]) for r in logged] == [3]
    for key in (
        "eval/fid",
        "eval/kid_mean",
        "eval/is_mean",
        "eval/precision",
        "eval/fd_dinov2",
        "eval/clip_score",
    ):
        assert np.isfinite(float(logged[0][key])), key
    assert float(logged[0]["eval/fid"]) > 0 and 0 <= float(logged[0]["eval/clip_score"]) <= 100


def _eval_args(trained, shards, weights, out_dir, *extra):
    return [
        f"ckpt={trained['checkpoint']}",
        f"prompts=[{','.join(PROMPTS)}]",
        f"reference={shards[1]}",
        "reference_num_images=12",
        f"reference_cache_dir={weights['cache']}",
        f"inception_weights={weights['inception']}",
        "fd_dinov2=true",
        f"dinov2_weights={weights['dinov2']}",
        f"clip_model={TINY_CLIP}",
        f"clip_pretrained={weights['clip']}",
        "num_images=8",
        "batch_size=4",
        "sampler.num_steps=3",
        "progress=false",
        f"out_dir={out_dir}",
        *extra,
    ]


def clip_only(args: list[str]) -> list[str]:
    """CLI arguments without a reference set (and so without the metrics that need one)."""
    return [a for a in args if not a.startswith(("reference=", "fd_dinov2="))]


@pytest.fixture(scope="module")
def sweep(trained, shards, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    run_cli(
        ["eval/fid.py", *_eval_args(trained, shards, weights, out, "guidance_scales=[1,3]", "wandb=true")]
    )
    return out


def test_fid_cli_sweep_writes_results_protocol_plot_and_wandb(sweep, trained):
    assert {"result_cfg1.json", "result_cfg3.json", "sweep.json", "fid_vs_clip.png"} <= {
        p.name for p in sweep.iterdir()
    }
    result = json.loads((sweep / "result_cfg3.json").read_text())
    metrics, protocol = result["metrics"], result["protocol"]
    inception_metrics = {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall"}
    dinov2_metrics = {"fd_dinov2", "precision_dinov2", "recall_dinov2"}
    assert set(metrics) == inception_metrics | dinov2_metrics | {"clip_score"}
    assert all(np.isfinite(v) for v in metrics.values())
    assert protocol["num_images"] == protocol["scored_images"] == 8 and protocol["image_size"] == [32, 32]
    assert protocol["sampler"]["name"] == "DDIMSampler" and protocol["sampler"]["num_steps"] == 3
    assert protocol["guidance_scale"] == 3.0 and protocol["captions"]["num_captions"] == 3
    inception = protocol["inception"]
    assert inception["feature_extractor"]["resize"] == "torch-fidelity"
    assert inception["reference"]["num_images"] == 12 and inception["reference"]["resolution"] == 32
    assert protocol["clip"]["model_name"] == TINY_CLIP
    dinov2 = protocol["dinov2"]
    assert dinov2["feature_extractor"]["architecture"] == {"embed_dim": 128, "depth": 2, "num_heads": 2}
    assert dinov2["feature_extractor"]["resize"] == "torch" and dinov2["reference"]["num_images"] == 12
    assert dinov2["precision_recall"]["neighborhood"] == 3 and 0 <= metrics["recall_dinov2"] <= 1
    assert result["checkpoint"]["path"] == str(Path(trained["checkpoint"]).resolve())
    points = json.loads((sweep / "sweep.json").read_text())["points"]
    assert [p["guidance_scale"] for p in points] == [1.0, 3.0] and points[1]["fid"] == metrics["fid"]
    assert points[0]["fid"] != points[1]["fid"]  # the guidance scale reaches the sampler
    runs = list((sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("*.wandb")).read_bytes()  # the run's record log: summary keys are stored as text
    for key in (b"eval/cfg3/fid", b"eval/cfg1/clip_score", b"protocol/inception/feature_extractor/resize"):
        assert key in log, key


@pytest.mark.slow
def test_clip_score_cli(trained, shards, weights, tmp_path, sweep):
    args = _eval_args(trained, shards, weights, tmp_path, "guidance_scale=3")
    run_cli(["eval/clip_score.py", *clip_only(args)])
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result["metrics"]) == {"clip_score"} and result["protocol"]["inception"] is None
    reference = json.loads((sweep / "result_cfg3.json").read_text())["metrics"]["clip_score"]
    assert result["metrics"]["clip_score"] == pytest.approx(reference, rel=1e-9)


@pytest.mark.slow
def test_guidance_interval_outside_every_step_scores_as_no_guidance(
    trained, shards, weights, tmp_path, sweep
):
    """guidance_interval reaches the sampler: a band no step's sigma falls in leaves every step unguided, so
    guidance 3 then gives guidance 1's images and score exactly; the protocol records the band."""
    args = _eval_args(trained, shards, weights, tmp_path, "guidance_scale=3", "guidance_interval=[1000,2000]")
    run_cli(["eval/clip_score.py", *clip_only(args)])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["protocol"]["guidance_interval"] == [1000.0, 2000.0]
    unguided = json.loads((sweep / "result_cfg1.json").read_text())["metrics"]["clip_score"]
    guided = json.loads((sweep / "result_cfg3.json").read_text())["metrics"]["clip_score"]
    assert result["metrics"]["clip_score"] == pytest.approx(unguided, rel=1e-9) and unguided != guided


@pytest.mark.slow
def test_two_processes_give_the_one_process_numbers(trained, shards, weights, tmp_path, sweep):
    """torchrun, 2 CPU processes (gloo): the reference statistics are computed split over both (fresh cache),
    images are shared out, and FID / KID / IS / CLIP equal the single-process run's."""
    args = _eval_args(trained, shards, weights, tmp_path / "out", "guidance_scale=3")
    args = [a for a in args if not a.startswith("reference_cache_dir=")] + [f"reference_cache_dir={tmp_path}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29533"]
    run_cli(["eval/fid.py", *args], launcher=torchrun)
    two = json.loads((tmp_path / "out" / "result.json").read_text())
    one = json.loads((sweep / "result_cfg3.json").read_text())
    assert two["run"]["world_size"] == 2 and one["run"]["world_size"] == 1
    for key, value in one["metrics"].items():
        # the same up to float32 rounding of the features (1 vs 2 threads, other batch shapes in the convolutions),
        # which KID's spread over subsets magnifies: 1.6e-6 relative on torch 2.11. One image left out or counted
        # twice moves every metric by orders of magnitude more.
        assert two["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key

    def by_network(folder) -> dict:
        stats = [load_reference(f) for f in Path(folder).glob("fid_reference_*.npz")]
        return {
            s.info["feature_extractor"]["network"]: s for s in stats if s.info.get("requested_images") == 12
        }

    fresh, cached = by_network(tmp_path), by_network(weights["cache"])
    assert len(fresh) == 2 and fresh.keys() == cached.keys()  # Inception and DINOv2
    for network, stats in fresh.items():
        np.testing.assert_allclose(stats.features, cached[network].features, rtol=0, atol=1e-6)


def test_checkpoint_paths_expand_patterns_and_lists(tmp_path):
    from ldm.utils.checkpoint import checkpoint_paths

    for name in ("b.ckpt", "a.ckpt", "c.txt"):
        (tmp_path / name).write_text("")
    assert checkpoint_paths(str(tmp_path / "a.ckpt")) == [str(tmp_path / "a.ckpt")]
    assert checkpoint_paths(str(tmp_path / "*.ckpt")) == [str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt")]
    both = checkpoint_paths([str(tmp_path / "c.txt"), str(tmp_path / "*.ckpt")])
    assert both == [str(tmp_path / n) for n in ("c.txt", "a.ckpt", "b.ckpt")]
    with pytest.raises(FileNotFoundError, match="no checkpoint matches"):
        checkpoint_paths(str(tmp_path / "*.pt"))


@pytest.mark.slow
def test_several_checkpoints_score_as_they_would_alone(trained, shards, weights, tmp_path, sweep):
    """ckpt=[last, a post-hoc EMA of it]: each is scored into out_dir/<name>/ exactly as a run of its own would
    (the reference statistics, Inception and CLIP built once change nothing), and checkpoints.json and the plot
    compare them, with the EMA width of the post-hoc one."""
    from ldm.training.posthoc_ema import find_snapshots, posthoc_checkpoint
    from ldm.utils.checkpoint import atomic_save

    last = Path(trained["checkpoint"])
    snapshots = find_snapshots(last.parent / "posthoc_ema")
    wide = tmp_path / "posthoc" / "sigma_rel-0.200.ckpt"
    atomic_save(posthoc_checkpoint(last, snapshots, 0.2)[0], wide)
    args = [
        a
        for a in _eval_args(trained, shards, weights, tmp_path / "out", "guidance_scale=3")
        if "ckpt=" not in a
    ]
    run_cli(["eval/fid.py", f"ckpt=[{last},{wide}]", *args])
    out = tmp_path / "out"
    alone = json.loads((sweep / "result_cfg3.json").read_text())["metrics"]
    ours = json.loads((out / "last" / "result.json").read_text())
    for key, value in alone.items():
        assert ours["metrics"][key] == pytest.approx(value, rel=1e-9), key
    theirs = json.loads((out / "sigma_rel-0.200" / "result.json").read_text())
    assert theirs["checkpoint"]["posthoc_ema"]["sigma_rel"] == 0.2 and "posthoc_ema" not in ours["checkpoint"]
    assert theirs["metrics"]["fid"] != ours["metrics"]["fid"]  # other weights, other images
    points = json.loads((out / "checkpoints.json").read_text())["points"]
    assert [p["name"] for p in points] == ["last", "sigma_rel-0.200"]
    assert points[1]["fid"] == theirs["metrics"]["fid"] and points[1]["posthoc_ema"]["step"] == 4
    assert (out / "fid_by_checkpoint.png").stat().st_size > 0
