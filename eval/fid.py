"""FID, KID, Inception Score and precision / recall of a checkpoint's samples: `python eval/fid.py ckpt=… prompts=… reference=…`.

- FID (Heusel et al. 2017, eq. 6): ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½), torchmetrics'
  `FrechetInceptionDistance` with its states in float64; the reference side comes from cached statistics.
- KID (Bińkowski et al. 2018, eq. 4): unbiased MMD² with the cubic kernel (xᵀy/d + 1)³, averaged over random
  subsets: torch-fidelity's `kid_features_to_metric`, its default subsets and seed.
- IS (Salimans et al. 2016): exp E[KL(p(y|x) ‖ p(y))] over splits, from the logits: torch-fidelity's
  `isc_features_to_metric`, its default splits and seed.
- Precision / recall (Kynkäänniemi et al. 2019), k = 3: fidelity and coverage separately, on the pool features
  (as ADM's evaluator reports them).

All four come from one Inception pass per image; `fd_dinov2=true` adds FD_DINOv2 with its own precision / recall
(`eval.dinov2`). Generated features are gathered over processes in image order
(`IndexedFeatures`), so the numbers do not depend on how many processes made them.

Run with torchrun (`torchrun --nproc-per-node 8 eval/fid.py …`) or srun for several GPUs. `eval/clip_score.py`
is the same run without a reference (CLIP score only); `guidance_scales=[…]` sweeps.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torchmetrics.image.fid import FrechetInceptionDistance

if __name__ == "__main__":  # `python eval/fid.py`: import the repository's `eval` package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from eval.distributed import IndexedFeatures, is_distributed
from eval.features import POOL_DIM, InceptionFeatures, split_output
from eval.reference import ReferenceStats


@dataclass
class InceptionMetrics:
    fid: float
    kid_mean: float | None  # None when the reference has no features (a moments-only .npz)
    kid_std: float | None
    is_mean: float
    is_std: float
    precision: float | None  # None without reference features, or with fewer than k + 1 images
    recall: float | None
    num_images: int
    reference_images: int
    kid_subset_size: int | None
    isc_splits: int

    def as_dict(self) -> dict:
        return asdict(self)


class _Precomputed(nn.Module):
    """Identity "feature extractor": torchmetrics receives features that `InceptionFeatures` computed once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def frechet_metric(reference: ReferenceStats, holds_reference: bool = True) -> FrechetInceptionDistance:
    """torchmetrics' FID (float64) whose real side holds the reference statistics and survives `reset()`.

    torchmetrics sums *all* its states over processes, the real ones too: with several processes only one
    (`holds_reference`, rank 0) may hold the reference, the others hold zeros, or it would count once per process.
    """
    fid = FrechetInceptionDistance(feature=_Precomputed(len(reference.mu)), reset_real_features=False)
    fid.set_dtype(torch.float64)
    if holds_reference:
        fid.real_features_sum, fid.real_features_cov_sum, n = reference.fid_states()
        fid.real_features_num_samples = n.to(fid.real_features_num_samples)
    return fid


def precision_recall(
    generated: Tensor, real: Tensor, neighborhood: int = 3
) -> tuple[float | None, float | None]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of generated samples inside the union of
    the real samples' k-nearest-neighbour balls, and the share of real samples inside the generated ones' balls.
    torch-fidelity's implementation (k = 3, as the paper and ADM's evaluator), on whichever device the features
    are. (None, None) when a set has no k neighbours."""
    if min(len(generated), len(real)) <= neighborhood:
        return None, None
    out = prc_features_to_metric(
        generated.float(),
        real.to(generated.device, torch.float32),
        prc_neighborhood=neighborhood,
        prc_batch_size=10000,
        save_cpu_ram=True,  # distances in blocks of 10k rows: 10k x N floats at a time, not N x N
        verbose=False,
    )
    return out["precision"], out["recall"]


class FeatureScorer:
    """Accumulates generated images (any process, any order) and scores them against a reference in one feature
    space: Fréchet distance and precision / recall. `InceptionScorer` adds KID and IS; `eval.dinov2` gives the
    DINOv2 space (FD_DINOv2)."""

    def __init__(self, extractor: nn.Module, reference: ReferenceStats, prc_neighborhood: int = 3) -> None:
        dim = getattr(extractor, "dim", POOL_DIM)
        if len(reference.mu) != dim:
            raise ValueError(f"reference statistics have {len(reference.mu)} dimensions, expected {dim}")
        self.extractor, self.reference, self.prc_neighborhood = extractor, reference, prc_neighborhood
        holds_reference = not is_distributed() or torch.distributed.get_rank() == 0  # torchmetrics syncs then
        self.fid = frechet_metric(reference, holds_reference).to(extractor.device)
        self.features = IndexedFeatures().to(extractor.device)

    def reset(self) -> None:
        self.fid.reset()
        self.features.reset()

    @torch.no_grad()
    def update(self, indices: Sequence[int] | Tensor, images: Tensor) -> None:
        """uint8 images (B, 3, H, W) and their indices in the evaluation set."""
        out = self.extractor(images)
        features, logits = split_output(out)
        self.fid.update(features.double(), real=False)
        self.features.update(torch.as_tensor(indices), features, logits)

    def _compute(self) -> tuple[float, Tensor, Tensor, float | None, float | None]:
        """(Fréchet distance, features, logits, precision, recall); all processes must call (torchmetrics
        gathers) and get the same values."""
        distance = float(self.fid.compute())
        _, features, logits = self.features.compute()
        precision = recall = None
        if self.reference.features is not None:
            real = torch.from_numpy(self.reference.features)
            precision, recall = precision_recall(features, real, self.prc_neighborhood)
        return distance, features, logits, precision, recall

    def _protocol(self) -> dict:
        return {
            "feature_extractor": self.extractor.identity(),
            "reference": {k: v for k, v in self.reference.info.items() if k != "feature_extractor"},
            "precision_recall": {
                "method": "Kynkäänniemi et al. 2019 (torch-fidelity), on the features above",
                "neighborhood": self.prc_neighborhood,
            },
        }


class InceptionScorer(FeatureScorer):
    """FID, KID, IS and precision / recall from one Inception pass per image."""

    def __init__(
        self,
        extractor: InceptionFeatures,
        reference: ReferenceStats,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        isc_splits: int = 10,
        rng_seed: int = 2020,
        prc_neighborhood: int = 3,
    ) -> None:
        super().__init__(extractor, reference, prc_neighborhood)
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.isc_splits, self.rng_seed = isc_splits, rng_seed

    def compute(self) -> InceptionMetrics:
        """All processes must call (torchmetrics gathers); the values are the same on each."""
        fid, pool, logits, precision, recall = self._compute()
        n = len(pool)
        splits = max(1, min(self.isc_splits, n // 2))  # at least 2 images per split
        isc = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=True, rng_seed=self.rng_seed)
        kid_mean = kid_std = subset = None
        if self.reference.features is not None:
            subset = min(self.kid_subset_size, n, self.reference.num_images)
            kid = kid_features_to_metric(
                pool.cpu(),
                torch.from_numpy(self.reference.features),
                kid_subsets=self.kid_subsets,
                kid_subset_size=subset,
                rng_seed=self.rng_seed,
                verbose=False,
            )
            kid_mean = kid["kernel_inception_distance_mean"]
            kid_std = kid["kernel_inception_distance_std"]
        return InceptionMetrics(
            fid=fid,
            kid_mean=kid_mean,
            kid_std=kid_std,
            is_mean=isc["inception_score_mean"],
            is_std=isc["inception_score_std"],
            precision=precision,
            recall=recall,
            num_images=n,
            reference_images=self.reference.num_images,
            kid_subset_size=subset,
            isc_splits=splits,
        )

    def protocol(self) -> dict:
        return {
            **self._protocol(),
            "fid": "torchmetrics FrechetInceptionDistance, float64 states (Heusel et al. 2017)",
            "kid": {
                "implementation": "torch-fidelity",
                "subsets": self.kid_subsets,
                "max_subset_size": self.kid_subset_size,
                "kernel": "poly(3, 1/d, 1)",
            },
            "isc": {
                "implementation": "torch-fidelity",
                "max_splits": self.isc_splits,
                "features": "logits_unbiased",
            },
            "rng_seed": self.rng_seed,
        }


def main() -> None:
    from eval.runner import cli

    cli("eval")


if __name__ == "__main__":
    main()
