"""KL-regularised autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models").

Module names mirror CompVis `ldm/modules/diffusionmodules/model.py` (Encoder/Decoder) and
`ldm/models/autoencoder.py` (AutoencoderKL: quant_conv / post_quant_conv), so a pretrained SD VAE state dict
loads with few or no renames. With the SD sizes (128, (1, 2, 4, 4), 2 res blocks, 4 latent channels) this
module has SD's parameter count, 83,653,863.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.attention import AttnBlock
from ldm.models.layers import Downsample, ResnetBlock, Upsample, group_norm


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x), parameterised by (mean, logvar) stacked along channels."""

    def __init__(self, parameters: Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over C, H, W: (B,), in fp32.

        Under bf16 autocast the encoder hands over bf16 (mean, logvar), and a CPU autocast keeps exp/pow/sum in
        bf16: a sum over thousands of latent values rounded to 8 significant bits. (CUDA autocast runs these in
        fp32 already.)"""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=(1, 2, 3))

    def nll(self, x: Tensor) -> Tensor:
        """-log q(x) per sample, summed over C, H, W: (B,)."""
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (x - self.mean).pow(2) / self.var, dim=(1, 2, 3)
        )


@dataclass
class AutoencoderOutput:
    reconstruction: Tensor
    posterior: DiagonalGaussian


class _Level(nn.Module):
    """One resolution level; a plain container so state-dict keys read `down.0.block.1.conv1.weight`."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, num_groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout, num_groups=num_groups)
        self.attn_1 = AttnBlock(channels, num_groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout, num_groups=num_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        mid_attention: bool,
        dropout: float,
        num_groups: int,
    ):
        super().__init__()
        channel_mult = tuple(channel_mult)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch = base_channels
        for i, mult in enumerate(channel_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(ch, base_channels * mult, dropout=dropout, num_groups=num_groups))
                ch = base_channels * mult
            level = _Level(blocks)
            if i != len(channel_mult) - 1:
                level.downsample = Downsample(ch, asymmetric_pad=True)
            self.down.append(level)
        self.mid = _Mid(ch, dropout, num_groups, mid_attention)
        self.norm_out = group_norm(ch, num_groups)
        self.conv_out = nn.Conv2d(ch, 2 * z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        out_channels: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        mid_attention: bool,
        dropout: float,
        num_groups: int,
    ):
        super().__init__()
        channel_mult = tuple(channel_mult)
        ch = base_channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, ch, 3, padding=1)
        self.mid = _Mid(ch, dropout, num_groups, mid_attention)
        levels: list[_Level] = []
        for i in reversed(range(len(channel_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(
                    ResnetBlock(ch, base_channels * channel_mult[i], dropout=dropout, num_groups=num_groups)
                )
                ch = base_channels * channel_mult[i]
            level = _Level(blocks)
            if i != 0:
                level.upsample = Upsample(ch)
            levels.insert(0, level)  # up[0] is the highest resolution, as in CompVis
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(ch, num_groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class KLAutoencoder(nn.Module):
    """Image (B, C, H, W) in [-1, 1] ↔ latent (B, latent_channels, H / f, W / f), f = 2 ** (len(channel_mult) - 1).

    H and W must be divisible by f for `decode(encode(x))` to return the input size.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        latent_channels: int = 4,
        mid_attention: bool = True,
        dropout: float = 0.0,
        num_groups: int = 32,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        self.latent_channels = latent_channels
        self.channel_mult = channel_mult
        # SD uses z_channels == embed_dim; one number here.
        arch = dict(
            base_channels=base_channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            z_channels=latent_channels,
            mid_attention=mid_attention,
            dropout=dropout,
            num_groups=num_groups,
        )
        self.encoder = Encoder(in_channels, **arch)
        self.decoder = Decoder(out_channels, **arch)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def last_layer(self) -> nn.Parameter:
        """Decoder output weight, for the adaptive GAN weight (gradient-norm ratio) of the VAE loss."""
        return self.decoder.conv_out.weight

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # (B, 2 * latent_channels, H/f, W/f)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> AutoencoderOutput:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return AutoencoderOutput(reconstruction=self.decode(z), posterior=posterior)
