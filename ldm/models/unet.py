"""Cross-attention UNet, laid out as SD's `openaimodel.UNetModel` (Rombach et al. 2022; SD2-base sizes by default).

input_blocks / middle_block / output_blocks / out follow SD's structure and parameter counts exactly
(SD2-base: 865,910,724); the residual blocks use the CompVis autoencoder's names (norm1/conv1/temb_proj/...)
rather than openaimodel's in_layers/emb_layers/out_layers, so mapping SD UNet weights needs renames.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.models.attention import SpatialTransformer
from ldm.models.layers import Downsample, ResnetBlock, Upsample, group_norm, timestep_embedding, zero_module
from ldm.utils.speed import recompute_tally

_UNET_NORM_EPS = 1e-5  # openaimodel's GroupNorm32 uses PyTorch's default eps (the VAE uses 1e-6)
MICRO_DIM = 256  # sinusoidal features per micro-conditioning scalar (SDXL's 256)
MICRO_SIZES = 6  # original (h, w), crop (top, left), target (h, w), in pixels


def micro_conditioning(
    original_size: Tensor, crop_coords: Tensor, target_size: Tensor | None = None
) -> Tensor:
    """SDXL's size and crop conditioning (Podell et al. 2023, sec. 2.2) as the UNet's `micro` input (B, 6):
    original (h, w), crop top-left (top, left), target (h, w), each (B, 2) in pixels; target defaults to the
    original (no crop)."""
    target_size = original_size if target_size is None else target_size
    return torch.cat([original_size, crop_coords, target_size], dim=-1).float()


def default_micro_conditioning(batch: int, height: int, width: int, device=None) -> Tensor:
    """The conditioning to sample with: an uncropped image of its own size, original = target = (height, width)."""
    size = torch.tensor([[height, width]], device=device).expand(batch, 2)
    return micro_conditioning(size, torch.zeros_like(size))


class EmbedSequential(nn.Sequential):
    """Runs its layers in order, giving each the inputs it takes: ResnetBlock gets the timestep
    embedding, SpatialTransformer the context; optionally each of those under activation checkpointing.

    A Sequential rather than a ModuleList (same state-dict keys): torch 2.11's FSDP2 refuses any ModuleList as a
    unit, even one with its own forward (2.14 accepts one that has it)."""

    def forward(
        self,
        x: Tensor,
        emb: Tensor,
        context: Tensor,
        context_mask: Tensor | None = None,
        use_checkpoint: bool = False,
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResnetBlock):
                args = (x, emb)
            elif isinstance(layer, SpatialTransformer):
                args = (x, context, context_mask)
            else:
                x = layer(x)
                continue
            if use_checkpoint:  # recomputation tallied apart while FLOPs are counted (MFU leaves it out)
                x = checkpoint(layer, *args, use_reentrant=False, **recompute_tally())
            else:
                x = layer(*args)
        return x


class CrossAttentionUNet(nn.Module):
    """eps/v/x0 network (the parameterisation is the diffusion code's business): (x_t, t, context) → (B, C_out, H, W).

    `attention_resolutions` are downsampling factors (1 = full latent resolution), SD's convention.
    Exactly one of `head_dim` (heads = channels // head_dim) and `num_heads` must be set. `qk_norm`: RMSNorm on each
    attention head's queries and keys (SD3's stabiliser; `ldm.models.attention.CrossAttention`). `dropout` acts in
    the residual blocks only, as in SD's UNetModel and diffusers' UNet2DConditionModel (their transformer blocks
    get none).
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        head_dim: int | None = 64,
        num_heads: int | None = None,
        transformer_depth: int = 1,
        context_dim: int = 1024,
        dropout: float = 0.0,
        num_groups: int = 32,
        gradient_checkpointing: bool = False,
        pooled_dim: int | None = None,
        micro_conditioning: bool = False,
        qk_norm: bool = False,
    ):
        super().__init__()
        if (head_dim is None) == (num_heads is None):
            raise ValueError(f"set exactly one of head_dim and num_heads, got {head_dim=} and {num_heads=}")
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = {int(r) for r in attention_resolutions}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.channel_mult = channel_mult
        self.context_dim = context_dim
        self.gradient_checkpointing = gradient_checkpointing
        self.qk_norm = qk_norm
        time_embed_dim = 4 * model_channels

        def heads_for(ch: int) -> tuple[int, int]:
            if head_dim is not None:
                if ch % head_dim:
                    raise ValueError(f"channels {ch} not divisible by head_dim {head_dim}")
                return ch // head_dim, head_dim
            if ch % num_heads:
                raise ValueError(f"channels {ch} not divisible by num_heads {num_heads}")
            return num_heads, ch // num_heads

        def res_block(ch_in: int, ch_out: int) -> ResnetBlock:
            return ResnetBlock(
                ch_in, ch_out, time_embed_dim, dropout, num_groups, eps=_UNET_NORM_EPS, zero_init=True
            )

        def transformer(ch: int) -> SpatialTransformer:
            heads, dim_head = heads_for(ch)
            return SpatialTransformer(
                ch, heads, dim_head, context_dim, transformer_depth, 0.0, num_groups, qk_norm
            )

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.pooled_proj = nn.Linear(pooled_dim, time_embed_dim) if pooled_dim else None
        # zero-initialised: a UNet given micro-conditioning starts as the same function as one without, so a plain
        # checkpoint (init_from) can be continued with it
        self.micro_conditioning = micro_conditioning
        self.micro_proj = (
            zero_module(nn.Linear(MICRO_SIZES * MICRO_DIM, time_embed_dim)) if micro_conditioning else None
        )

        self.input_blocks = nn.ModuleList(
            [EmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res_block(ch, ch), transformer(ch), res_block(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch, num_groups, _UNET_NORM_EPS),
            nn.SiLU(),
            zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def blocks(self) -> list[nn.Module]:
        """The input, middle and output blocks in order: the units FSDP gathers and frees one at a time."""
        return [*self.input_blocks, self.middle_block, *self.output_blocks]

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
        micro: Tensor | None = None,
    ) -> Tensor:
        """x: (B, C, H, W) latents, H and W divisible by `downsample_factor`; t: (B,) or scalar timesteps,
        float or integer (non-integer values are fine); context: (B, L, context_dim); context_mask: (B, L)
        bool, True = attend; pooled: (B, pooled_dim), required iff the model was built with `pooled_dim`;
        micro: (B, 6) sizes in pixels (`micro_conditioning`), required iff built with `micro_conditioning`."""
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} must be divisible by {f}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        param_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(param_dtype))  # (B, 4 * mc)
        if self.pooled_proj is not None:
            if pooled is None:
                raise ValueError("this UNet was built with pooled_dim and needs `pooled`")
            emb = emb + self.pooled_proj(pooled.to(param_dtype))
        if self.micro_proj is not None:
            if micro is None:
                raise ValueError("this UNet was built with micro_conditioning and needs `micro` (B, 6)")
            features = timestep_embedding(micro.flatten(), MICRO_DIM)  # (B * 6, 256): each scalar apart
            emb = emb + self.micro_proj(features.reshape(x.shape[0], -1).to(param_dtype))
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()

        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context, context_mask, use_ckpt)
            skips.append(h)
        h = self.middle_block(h, emb, context, context_mask, use_ckpt)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, h, w)
            h = block(h, emb, context, context_mask, use_ckpt)
        return self.out(h)
