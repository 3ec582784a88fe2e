"""Building blocks shared by the autoencoder and the UNet.

Module names follow CompVis `ldm/modules/diffusionmodules/model.py` (norm1/conv1/temb_proj/norm2/conv2/
nin_shortcut), so pretrained SD autoencoder weights map onto `ResnetBlock` without renames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, num_groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm whose group count divides `channels`: gcd(num_groups, channels).

    With the default 32 groups this is SD's `Normalize` for every SD width; tiny widths (16, 48, ...)
    fall back to a divisor instead of failing.
    """
    return nn.GroupNorm(math.gcd(num_groups, channels), channels, eps=eps, affine=True)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly non-integer) timesteps, as in SD's openaimodel: [cos | sin].

    t: (B,) float or integer timesteps. Returns (B, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv3x3 (+ projected timestep embedding) → GroupNorm → SiLU → dropout → conv3x3, residual.

    `temb_channels=0` gives the autoencoder's block (no `temb_proj`). `zero_init=True` zeroes `conv2`
    so the block starts as the identity on its shortcut (SD's UNet does this; its VAE does not).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int = 0,
        dropout: float = 0.0,
        num_groups: int = 32,
        eps: float = 1e-6,
        zero_init: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = group_norm(in_channels, num_groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels) if temb_channels > 0 else None
        self.norm2 = group_norm(out_channels, num_groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if zero_init:
            zero_module(self.conv2)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb_proj is not None:
            if temb is None:
                raise ValueError(
                    "this ResnetBlock was built with temb_channels > 0 and needs a timestep embedding"
                )
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Strided 3x3 conv halving H and W.

    `asymmetric_pad=True` is the CompVis autoencoder's variant (pad right/bottom by one, no conv padding);
    `False` is the UNet's (symmetric padding 1). Both give ceil(H / 2).
    """

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
