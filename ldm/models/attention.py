"""Attention blocks: the autoencoder's single-head spatial self-attention and SD2's `SpatialTransformer`.

Names follow CompVis `model.py` (AttnBlock: norm/q/k/v/proj_out) and `attention.py`
(SpatialTransformer: norm/proj_in/transformer_blocks/proj_out; BasicTransformerBlock: attn1/ff/attn2/norm1-3;
CrossAttention: to_q/to_k/to_v/to_out). All attention goes through `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.models.layers import group_norm, zero_module


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv projections, residual."""

    def __init__(self, channels: int, num_groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm = group_norm(channels, num_groups, eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        q, k, v = (
            rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v)
        )  # (B, 1, N, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, N, C)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` (B, N, query_dim) to `context` (B, L, context_dim); self-attention if no context.

    `qk_norm`: RMSNorm (learnt gain per channel of a head) on every head's queries and keys before their dot
    product, as ViT-22B (Dehghani et al. 2023) introduced and SD3 (Esser et al. 2024) uses: the attention logits
    are bounded by the gains, whatever scale the projections grow to, against the logit growth that makes large
    models diverge in mixed precision.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        qk_norm: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.norm_q = nn.RMSNorm(dim_head, eps=1e-6) if qk_norm else None
        self.norm_k = nn.RMSNorm(dim_head, eps=1e-6) if qk_norm else None

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """context_mask: (B, L) bool, True = attend. A sample whose mask is all False gets a zero attention
        output (before `to_out`) instead of the NaN a fully masked softmax would give."""
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, H, N, D)
        k = rearrange(self.to_k(context), "b l (h d) -> b h l d", h=self.heads)  # (B, H, L, D)
        v = rearrange(self.to_v(context), "b l (h d) -> b h l d", h=self.heads)  # (B, H, L, D)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        attn_mask = None
        any_valid = None
        if context_mask is not None:
            context_mask = context_mask.bool()
            any_valid = context_mask.any(dim=-1)  # (B,)
            # Let fully masked samples attend everywhere (finite softmax), then zero their output below.
            context_mask = context_mask | ~any_valid[:, None]
            attn_mask = rearrange(context_mask, "b l -> b 1 1 l")  # broadcast over heads and queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, D)
        if any_valid is not None:  # no host sync: always multiply
            out = out * rearrange(any_valid, "b -> b 1 1 1").to(out.dtype)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, H*D)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): x * gelu(gate), with x and gate from one Linear."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the context, GEGLU feed-forward; each residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        dropout: float = 0.0,
        qk_norm: bool = False,
    ):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout, qk_norm)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout, qk_norm)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """SD2 transformer over image tokens (`use_linear_in_transformer=True`):
    GroupNorm → Linear proj_in → depth × BasicTransformerBlock → zero-initialised Linear proj_out, residual."""

    def __init__(
        self,
        in_channels: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        depth: int = 1,
        dropout: float = 0.0,
        num_groups: int = 32,
        qk_norm: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.norm = group_norm(in_channels, num_groups, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, dropout, qk_norm)
                for _ in range(depth)
            ]
        )
        self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        _, _, height, width = x.shape
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")  # (B, N, C)
        h = self.proj_in(h)  # (B, N, inner)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask)
        h = self.proj_out(h)  # (B, N, C)
        return x + rearrange(h, "b (h w) c -> b c h w", h=height, w=width)
