"""Classifier-free guidance (Ho & Salimans 2022): conditioning dropout at training, guided denoiser at sampling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def drop_conditioning(
    batch_size: int, p: float, device: torch.device | str, generator: torch.Generator | None = None
) -> Tensor:
    """Bool mask (B,), True where a sample's conditioning is replaced by the null conditioning (p_uncond,
    Ho & Salimans 2022 Algorithm 1). The generator must live on ``device``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {p}")
    return torch.rand(batch_size, generator=generator, device=device) < p


def classifier_free_guidance(
    denoiser: Callable[[Tensor, Tensor, Any], Tensor],
    cond: Any,
    uncond: Any | None,
    scale: float,
    cat: Callable[[list], Any] | None = None,
    rescale: float = 0.0,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap ``denoiser(x_t, t, cond)`` into a guided ``model_fn(x_t, t)`` for the samplers.

    Output: ``out_uncond + scale * (out_cond - out_uncond)`` (Ho & Salimans 2022 eq. 6, with w = scale - 1).
    The combination is applied to the raw network output, whatever its parameterization: eps, v and x0 are
    affine in the output for fixed (x_t, t) and the weights (1 - scale, scale) sum to one, so guiding eps, v
    or x0 gives the same sample.

    ``rescale`` = phi > 0 applies guidance rescale (Lin et al. 2024, eq. 15-16) to that output, per sample:
    out_rescaled = out_cfg * std(out_cond) / std(out_cfg), returned as phi * out_rescaled + (1 - phi) * out_cfg.
    It counters the over-exposure of large scales; the paper uses phi = 0.7 with a v-prediction model (unlike
    plain guidance it depends on the parameterization, and like diffusers it is applied to the raw output).

    ``uncond is None`` or ``scale == 1`` → the plain conditional call. With ``cat`` (e.g. ``Conditioning.cat``),
    cond and uncond go through the network in one batched call on ``[x, x]``; without it, two calls.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    if uncond is None or scale == 1.0:

        def conditional(x_t: Tensor, t: Tensor) -> Tensor:
            return denoiser(x_t, t, cond)

        return conditional

    both = cat([cond, uncond]) if cat is not None else None

    def guided(x_t: Tensor, t: Tensor) -> Tensor:
        if both is not None:
            out_cond, out_uncond = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        else:
            out_cond = denoiser(x_t, t, cond)
            out_uncond = denoiser(x_t, t, uncond)
        out = out_uncond + scale * (out_cond - out_uncond)
        return rescale_guidance(out, out_cond, rescale) if rescale > 0 else out

    return guided


def rescale_guidance(out_cfg: Tensor, out_cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2024, eq. 15-16: match the per-sample std of the guided output to the conditional one's, by phi."""
    dims = tuple(range(1, out_cfg.ndim))
    rescaled = out_cfg * (out_cond.std(dim=dims, keepdim=True) / out_cfg.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * out_cfg
