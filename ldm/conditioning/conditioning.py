"""The conditioning a text encoder hands to the UNet (DESIGN.md contract 4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """Per-token text features and a pooled embedding.

    tokens: (B, L, D) hidden states the UNet cross-attends to.
    pooled: (B, P) pooled (projected) text embedding, or None.
    mask:   (B, L) bool, True where a token is real text (not padding), or None.
    """

    tokens: Tensor
    pooled: Tensor | None = None
    mask: Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _map(self, fn) -> Conditioning:
        return Conditioning(
            fn(self.tokens),
            None if self.pooled is None else fn(self.pooled),
            None if self.mask is None else fn(self.mask),
        )

    def to(self, *args, **kwargs) -> Conditioning:
        def move(t: Tensor) -> Tensor:
            # dtype casts apply to float features only; the mask stays bool
            return (
                t.to(*args, **kwargs) if t.is_floating_point() else t.to(device=_device_of(args, kwargs, t))
            )

        return self._map(move)

    def __getitem__(self, index) -> Conditioning:
        return self._map(lambda t: t[index])

    def expand(self, batch_size: int) -> Conditioning:
        """Repeat a batch-1 conditioning (e.g. the null prompt) to `batch_size`."""
        if len(self) != 1:
            raise ValueError(f"expand needs a batch of 1, got {len(self)}")
        return self._map(lambda t: t.expand(batch_size, *t.shape[1:]))

    def where(self, replace: Tensor, other: Conditioning) -> Conditioning:
        """Per sample: `other` where `replace` (B,) is True, else self (classifier-free guidance dropout)."""
        if len(other) == 1:
            other = other.expand(len(self))

        def pick(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            if a is None or b is None:
                return None
            r = replace.view(-1, *([1] * (a.ndim - 1)))
            return torch.where(r, b, a)

        return Conditioning(
            pick(self.tokens, other.tokens), pick(self.pooled, other.pooled), pick(self.mask, other.mask)
        )

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch (one batched call for cond + uncond in guidance)."""

        def cat_field(name: str) -> Tensor | None:
            values = [getattr(c, name) for c in items]
            return None if any(v is None for v in values) else torch.cat(values)

        return Conditioning(cat_field("tokens"), cat_field("pooled"), cat_field("mask"))


def _device_of(args, kwargs, t: Tensor):
    for a in (*args, kwargs.get("device")):
        if isinstance(a, str | torch.device):
            return a
        if isinstance(a, Tensor):
            return a.device
    return t.device
