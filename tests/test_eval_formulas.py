"""The evaluation metrics against independent float64 numpy / scipy computations of their published formulas, on
small random features (no weights, no images except for the CLIP preprocessing check)."""

import json

import numpy as np
import open_clip
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from eval.clip_score import ClipScore
from eval.features import InceptionOutput
from eval.fid import FeatureScorer, InceptionScorer
from eval.reference import ReferenceStats, moments

from .helpers import ROOT

TINY_CLIP = "ldm-tiny-text"


class _Features(nn.Module):
    """Stands for a feature extractor: its "images" are the features (and, with `logits`, the IS logits after them)."""

    def __init__(self, dim: int, logits: int = 0) -> None:
        super().__init__()
        self.dim, self.logits = dim, logits
        self.anchor = nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, x):
        if self.logits:
            return InceptionOutput(pool=x[:, : self.dim].float(), logits=x[:, self.dim :].float())
        return x.float()

    def identity(self) -> dict:
        return {}


def _pytorch_fid(f1: np.ndarray, f2: np.ndarray, eps: float = 1e-6) -> float:
    """pytorch-fid's `calculate_frechet_distance`, float64."""
    mu1, s1, mu2, s2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def _feed(scorer, rng, features: np.ndarray) -> None:
    """In shuffled chunks with their indices, as several processes' batches would arrive."""
    for chunk in np.array_split(rng.permutation(len(features)), 3):
        scorer.update(torch.as_tensor(chunk), torch.from_numpy(features[chunk]))


@pytest.mark.parametrize("moments_only", [False, True])
@pytest.mark.parametrize(("dim", "n_ref", "n_gen"), [(8, 50, 40), (32, 20, 25)])  # the second: singular Σ
def test_frechet_distance_is_pytorch_fid(dim, n_ref, n_gen, moments_only):
    rng = np.random.default_rng(dim)
    real = rng.normal(size=(n_ref, dim)).astype(np.float32)
    gen = (rng.normal(size=(n_gen, dim)) * 1.3 + 0.2).astype(np.float32)
    mu, sigma = moments(real)
    scorer = FeatureScorer(_Features(dim), ReferenceStats(mu, sigma, n_ref, None if moments_only else real))
    _feed(scorer, rng, gen)
    distance, features, _, _, _ = scorer._compute()
    np.testing.assert_array_equal(features.numpy(), gen)  # back in index order
    assert distance == pytest.approx(_pytorch_fid(real.astype(np.float64), gen.astype(np.float64)), rel=1e-7)


def test_frechet_distance_of_a_set_with_itself_is_zero_when_singular():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(20, 64)).astype(np.float32)
    mu, sigma = moments(real)
    scorer = FeatureScorer(_Features(64), ReferenceStats(mu, sigma, 20, real))
    _feed(scorer, rng, real)
    assert abs(scorer._compute()[0]) < 1e-4  # pytorch-fid: ~2e-6 here; the trace term is ~64


def test_kid_is_and_precision_recall_match_their_definitions():
    rng = np.random.default_rng(0)
    d, classes, n_ref, n_gen, subsets, size, splits, seed = 16, 10, 120, 90, 7, 50, 4, 123
    real = rng.normal(size=(n_ref, d)).astype(np.float32)
    gen = (rng.normal(size=(n_gen, d)) * 1.1 + 0.1).astype(np.float32)
    logits = (rng.normal(size=(n_gen, classes)) * 2).astype(np.float32)
    mu, sigma = moments(real)
    scorer = InceptionScorer(
        _Features(d, classes),
        ReferenceStats(mu, sigma, n_ref, real),
        kid_subsets=subsets,
        kid_subset_size=size,
        isc_splits=splits,
        rng_seed=seed,
    )
    _feed(scorer, rng, np.concatenate([gen, logits], 1))
    m = scorer.compute()

    # KID: unbiased MMD² with k(x, y) = (xᵀy / d + 1)³ over random subsets (torch-fidelity's sampling)
    draw, mmds = np.random.RandomState(seed), []
    for _ in range(subsets):
        x = gen[draw.choice(n_gen, size, replace=False)].astype(np.float64)
        y = real[draw.choice(n_ref, size, replace=False)].astype(np.float64)
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = size * (size - 1)
        mmds.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())
    assert m.kid_mean == pytest.approx(np.mean(mmds), rel=1e-5)
    assert m.kid_std == pytest.approx(np.std(mmds), rel=1e-5)

    # IS: exp E_x KL(p(y|x) ‖ p(y)) per split, mean and std over splits
    shuffled = logits[np.random.RandomState(seed).permutation(n_gen)].astype(np.float64)
    p = np.exp(shuffled - shuffled.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(splits):
        chunk = p[i * n_gen // splits : (i + 1) * n_gen // splits]
        scores.append(np.exp((chunk * (np.log(chunk) - np.log(chunk.mean(0)))).sum(1).mean()))
    assert m.is_mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert m.is_std == pytest.approx(np.std(scores), rel=1e-8)

    # precision / recall: k-th neighbour (k = 3, not counting the point itself) radii, manifold membership
    def radii(a):
        return np.sort(np.linalg.norm(a[:, None] - a[None], axis=-1), 1)[:, 3]

    g, r = gen.astype(np.float64), real.astype(np.float64)
    dist = np.linalg.norm(g[:, None] - r[None], axis=-1)
    real_radii, gen_radii = radii(r)[None], radii(g)[None]
    assert m.precision == pytest.approx((dist - real_radii <= 0).any(1).mean())
    assert m.recall == pytest.approx((dist.T - gen_radii <= 0).any(1).mean())


def test_clip_preprocessing_uses_the_models_interpolation(tmp_path):
    """open_clip's eval transform resizes with the model's `preprocess_cfg.interpolation` (bilinear for MobileCLIP,
    PE, …); bicubic for all would give those models other inputs than their own preprocessing."""
    torch.manual_seed(0)
    folder = tmp_path / "clip_bilinear"
    folder.mkdir()
    config = json.loads((ROOT / "ldm" / "conditioning" / "model_configs" / f"{TINY_CLIP}.json").read_text())
    preprocess_cfg = {"interpolation": "bilinear"}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": preprocess_cfg})
    )
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), folder / "open_clip_pytorch_model.bin")
    metric = ClipScore(f"local-dir:{folder}", None)
    images = torch.randint(0, 256, (3, 3, 64, 80), dtype=torch.uint8)
    transform = open_clip.image_transform(
        metric.image_size[0], is_train=False, mean=metric.mean, std=metric.std, interpolation="bilinear"
    )
    expected = torch.stack([transform(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])
    # PIL resamples 8-bit values (rounded), we float ones: 1/255 apart at most, over the CLIP std
    assert (metric.preprocess(images) - expected).abs().max() < 1.5 / 255 / min(metric.std)
    assert "bilinear" in metric.identity()["preprocess"]
