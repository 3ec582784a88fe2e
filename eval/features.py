"""Inception-v3 features for FID, KID and Inception Score, computed the way published numbers are.

The network is torch-fidelity's exact port of the TensorFlow Inception graph of 2015-12-05 that TTUR's FID
(Heusel et al. 2017), torch-fidelity and torchmetrics use: 2048-d pool features (FID, KID) and 1008 "unbiased"
logits (IS). Its weights are found offline only (`find_inception_weights`): an explicit file or the torch hub cache.

How an image reaches 299×299 moves FID by whole points (Parmar et al. 2022, "On Aliased Resizing and Surprising
Subtleties in GAN Evaluation"), so it is an explicit, recorded choice:

- "torch-fidelity" (default): bilinear *without* antialiasing, bit-compatible with TF1's `resize_bilinear` inside
  the original graph; what TTUR, torch-fidelity and torchmetrics (with `antialias=False`) compute, and so the
  protocol behind most published FIDs.
- "clean": PIL bicubic, antialiased, per channel in float (clean-fid's "clean" mode, Parmar et al. 2022).

Both take 8-bit images (what a PNG of a sample holds), so real and generated images are quantized alike.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from ldm.utils.checkpoint import file_sha256
from ldm.utils.weights import MissingWeightsError, find_weights

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_SHA256_PREFIX = "6726825d"  # torch hub convention: the file name carries its hash's prefix
INPUT_SIZE = 299
POOL_DIM, LOGITS_DIM = 2048, 1008
RESIZE_PROTOCOLS = {
    "torch-fidelity": "bilinear, no antialiasing, TF1-exact (torch-fidelity / TTUR / torchmetrics antialias=False)",
    "clean": "PIL bicubic, antialiased, per channel in float32 (clean-fid 'clean')",
}
# the graph up to the pool features, in torch-fidelity's order
_TRUNK = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "MaxPool_1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "MaxPool_2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "AvgPool",
)


@dataclass
class InceptionOutput:
    pool: Tensor  # (B, 2048) pool3 features: FID, KID
    logits: Tensor  # (B, 1008) logits without bias ("logits_unbiased"): Inception Score


def split_output(out: InceptionOutput | Tensor) -> tuple[Tensor, Tensor | None]:
    """(features, logits or None) of a feature extractor's output: Inception's pool features and IS logits, or
    DINOv2's features alone."""
    return (out.pool, out.logits) if isinstance(out, InceptionOutput) else (out, None)


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The FID Inception weights: `path` if given, else the torch hub cache. Never downloads."""
    return find_weights(
        None if path is None else str(path),
        INCEPTION_FILE,
        INCEPTION_URL,
        what="FID Inception-v3 (torch-fidelity)",
        config_key="inception_weights",
    )


class _Architecture(FeatureExtractorInceptionV3):
    """torch-fidelity's network around a state dict loaded by us (`weights_only=True`: a weights file is data, never
    code; torch-fidelity itself would unpickle it with `weights_only=False`). `None`: keep the random init."""

    def __init__(self, state_dict: dict | None) -> None:
        object.__setattr__(self, "_given_state", state_dict)
        with tempfile.TemporaryDirectory() as tmp:
            empty = Path(tmp) / "empty.pth"  # the parent insists on loading a file: it gets an empty one
            torch.save({}, empty)
            super().__init__("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
        object.__delattr__(self, "_given_state")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if "_given_state" in self.__dict__:  # called by the parent's __init__ with the empty file's {}
            if self._given_state is None:
                return None
            state_dict = self._given_state
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class InceptionFeatures(nn.Module):
    """uint8 images (B, 3, H, W) of any size → `InceptionOutput`, with the chosen resize protocol.

    For "torch-fidelity" the output equals torchmetrics' `NoTrainInceptionV3(antialias=False)` (checked in
    tests/test_eval.py); the forward is spelled out here so that "clean" can feed float pixels to the same layers.
    """

    def __init__(self, weights: str | os.PathLike | None = None, resize: str = "torch-fidelity") -> None:
        super().__init__()
        if resize not in RESIZE_PROTOCOLS:
            raise ValueError(f"resize must be one of {list(RESIZE_PROTOCOLS)}, got {resize!r}")
        self.resize = resize
        self.weights_path = find_inception_weights(weights)
        try:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise MissingWeightsError(
                f"inception_weights={self.weights_path} is not a readable state dict of {INCEPTION_FILE}: {err}"
            ) from err
        self.net = _Architecture(state).requires_grad_(False).eval()
        self.sha256 = file_sha256(self.weights_path)

    def identity(self) -> dict:
        """What a result records about the extractor (and what keys the reference-statistics cache)."""
        return {
            "network": "inception-v3-compat (torch-fidelity, TF 2015-12-05 graph)",
            "weights_file": self.weights_path.name,
            "weights_sha256": self.sha256,
            "official_weights": self.sha256.startswith(INCEPTION_SHA256_PREFIX),
            "resize": self.resize,
            "resize_method": RESIZE_PROTOCOLS[self.resize],
            "input_size": INPUT_SIZE,
            "features": f"pool3 ({POOL_DIM}) for FID/KID, logits_unbiased ({LOGITS_DIM}) for IS",
        }

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # batch norm statistics are part of the metric's definition

    @property
    def device(self) -> torch.device:
        return self.net.fc.weight.device

    def to_input(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) → float (B, 3, 299, 299) in [0, 255], resized by the protocol."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if self.resize == "clean":
            return clean_resize(images, INPUT_SIZE).to(self.device)
        x = images.to(self.device, torch.float32)
        return interpolate_bilinear_2d_like_tensorflow1x(
            x, size=(INPUT_SIZE, INPUT_SIZE), align_corners=False
        )

    @torch.no_grad()
    def forward(self, images: Tensor) -> InceptionOutput:
        x = (self.to_input(images) - 128) / 128  # the graph's own normalisation
        for name in _TRUNK:
            x = getattr(self.net, name)(x)
        pool = torch.flatten(x, 1)  # (B, 2048)
        return InceptionOutput(pool=pool, logits=pool @ self.net.fc.weight.T)


def clean_resize(images: Tensor, size: int) -> Tensor:
    """clean-fid's resize: each channel as a float32 PIL image, bicubic (antialiased), clipped to [0, 255]."""
    out = np.empty((images.shape[0], 3, size, size), dtype=np.float32)
    for i, image in enumerate(images.cpu().numpy()):
        for c in range(3):
            channel = Image.fromarray(image[c].astype(np.float32), mode="F")
            out[i, c] = np.asarray(channel.resize((size, size), Image.Resampling.BICUBIC)).clip(0, 255)
    return torch.from_numpy(out)


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [0, 1] → uint8, rounded as a PNG of them would be (`ldm.utils.images.to_pil`)."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def save_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialised state dict of the FID Inception, for tests and smoke runs without the real weights.

    Convolutions are He-initialised so that features stay O(1) through the ~40 layers. Metrics computed with it
    are not comparable to anything; results record the weights' hash (`official_weights: false`).
    """
    generator = torch.Generator().manual_seed(seed)
    net = _Architecture(None)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5
    net.fc.weight.data = torch.randn(net.fc.weight.shape, generator=generator) * 0.05
    net.fc.bias.data.zero_()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
