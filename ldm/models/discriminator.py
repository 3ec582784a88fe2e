"""PatchGAN discriminator (Isola et al. 2017, pix2pix §3.2.2), as taming-transformers' `NLayerDiscriminator`.

The stage-1 loss of taming / CompVis LDM trains the autoencoder against it. Module names (`main.N`) and init follow
taming's, so its discriminator state dicts load as they are.
"""

from __future__ import annotations

from torch import Tensor, nn

from ldm.models.layers import group_norm

NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return group_norm(channels, eps=1e-5)
    return nn.Identity()


def weights_init(module: nn.Module) -> None:
    """taming's `weights_init`: conv weights ~ N(0, 0.02); norm scales ~ N(1, 0.02), norm shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    """(B, in_channels, H, W) → (B, 1, h, w) real/fake logits, one per overlapping 70x70 patch (n_layers=3).

    n_layers stride-2 4x4 convs (the first without norm), one stride-1 4x4 conv with norm, one stride-1 4x4 conv to
    one channel; widths ndf · min(2^n, 8); LeakyReLU(0.2). 256 px → 30x30 logits, 32 px → 2x2.

    `norm="batch"` is taming's (and SD's) choice. BatchNorm uses per-GPU batch statistics, which are noisy at the
    small per-GPU batches of VAE training and differ between the real and fake passes; under DDP, "group" (or
    "none") gives a discriminator whose output does not depend on what else is in the batch. Convs followed by a
    norm have no bias, as in taming.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                _norm(norm, ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)
