"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), VGG16 variant, as used by the stage-1 loss of taming-transformers and CompVis LDM (`LPIPSWithDiscriminator`).

d(x, y) = Σ_l mean_hw ‖w_l ⊙ (f̂_l(x) − f̂_l(y))‖²  (eq. 1), f̂_l the channel-unit-normalised VGG16 activations at
relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 and w_l the learned 1x1 "lin" heads.

Weights: the ImageNet VGG16 backbone is torchvision's `vgg16-397923af.pth` (a local file or the torch hub cache,
never downloaded here); the lin heads ship inside torchmetrics (`functional/image/lpips_models/vgg.pth`), so they
are always available offline.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.vgg import cfgs, make_layers

from ldm.utils.weights import MissingWeightsError, find_weights

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
WEIGHTS_CONFIG_KEY = "stage.loss.lpips.vgg_weights"
SLICE_ENDS = (4, 9, 16, 23, 30)  # `vgg16().features` index after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16(weights=None).features`, same modules and init, without the 120M-parameter classifier."""
    features = make_layers(cfgs["D"], batch_norm=False)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return features


def lpips_heads_path() -> Path:
    """The VGG lin heads of the original LPIPS release, as bundled with torchmetrics."""
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError("LPIPS lin heads: torchmetrics is not installed (pip install torchmetrics)")
    path = Path(next(iter(spec.submodule_search_locations))) / "functional/image/lpips_models/vgg.pth"
    if not path.is_file():
        raise MissingWeightsError(f"LPIPS lin heads: {path} is missing from the torchmetrics installation")
    return path


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16 distance between images in [-1, 1]: `lpips(x, y)` → (B,), differentiable in x and y.

    `pretrained=False`: torchvision's random VGG init and heads w_l = 1 (the paper's "baseline" variant, a
    non-negative distance); for tests and the CPU quickstart only. The module stays in eval mode.
    """

    shift: Tensor
    scale: Tensor

    def __init__(self, pretrained: bool = True, vgg_weights: str | None = None) -> None:
        super().__init__()
        # ImageNet normalisation expressed for inputs in [-1, 1] (the LPIPS "ScalingLayer")
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        features = vgg16_features()
        starts = (0, *SLICE_ENDS[:-1])
        # children keep their `features` index as name, so `slices.1.5.weight` is torchvision's `features.5.weight`
        self.slices = nn.ModuleList(
            nn.Sequential(OrderedDict((str(i), features[i]) for i in range(a, b)))
            for a, b in zip(starts, SLICE_ENDS)
        )
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        for head in self.heads:
            nn.init.ones_(head.weight)
        if pretrained:
            path = find_weights(
                vgg_weights, VGG16_FILE, VGG16_URL, "LPIPS VGG16 (ImageNet)", WEIGHTS_CONFIG_KEY
            )
            self.load_backbone(torch.load(path, map_location="cpu", weights_only=True))
            self.load_heads(torch.load(lpips_heads_path(), map_location="cpu", weights_only=True))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def load_backbone(self, state: Mapping[str, Tensor]) -> None:
        """Copy a torchvision `vgg16` state dict (`features.N.weight/bias`; the classifier is ignored)."""
        wanted = {
            f"{s}.{name}": f"features.{name}"
            for s, block in enumerate(self.slices)
            for name, _ in block.named_parameters()
        }
        missing = sorted(set(wanted.values()) - set(state))
        if missing:
            raise ValueError(f"not a torchvision vgg16 state dict: missing {missing[:3]} ...")
        self.slices.load_state_dict({ours: state[theirs] for ours, theirs in wanted.items()})

    def load_heads(self, state: Mapping[str, Tensor]) -> None:
        """Copy the lin heads of an LPIPS release (`lin{l}.model.1.weight`, or `.model.0.` without dropout)."""
        with torch.no_grad():
            for i, head in enumerate(self.heads):
                key = next(
                    (k for k in (f"lin{i}.model.1.weight", f"lin{i}.model.0.weight") if k in state), None
                )
                if key is None:
                    raise ValueError(f"not an LPIPS lin-head state dict: no lin{i}.model.*.weight")
                head.weight.copy_(state[key])

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = (torch.cat([x, y]) - self.shift) / self.scale  # (2B, 3, H, W): one backbone pass for both
        distance = x.new_zeros(x.shape[0], 1)
        for block, head in zip(self.slices, self.heads):
            h = block(h)
            # eps inside the sqrt (torchmetrics' variant): finite gradients where a feature vector is all zero
            f = h / torch.sqrt(h.pow(2).sum(dim=1, keepdim=True) + 1e-8)
            fx, fy = f.chunk(2)
            distance = distance + head((fx - fy).pow(2)).mean(dim=(2, 3))  # (B, 1)
        return distance[:, 0]
