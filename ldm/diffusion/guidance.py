"""Classifier-free guidance (Ho & Salimans 2022): conditioning dropout at training, guided denoiser at sampling;
autoguidance (Karras et al. 2024): guidance by a weaker model instead of the unconditional output."""

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
    interval: tuple[float, float] | None = None,
    sigma_at: Callable[[Tensor], Tensor] | None = None,
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

    ``interval`` = (sigma_lo, sigma_hi) guides only the steps whose noise level sigma (``sigma_at(t)``, the
    diffusion's ``sigma_at``) lies in (sigma_lo, sigma_hi]; the others take the plain conditional output, in one
    network call instead of two (Kynkaenniemi et al. 2024, "Applying guidance in a limited interval improves sample
    and distribution quality": guidance at high noise costs diversity and at low noise does little).

    ``uncond is None`` or ``scale == 1`` → the plain conditional call. With ``cat`` (e.g. ``Conditioning.cat``),
    cond and uncond go through the network in one batched call on ``[x, x]``; without it, two calls.
    """
    if uncond is None or scale == 1.0:
        _check(rescale, interval, sigma_at)
        return _conditional(denoiser, cond)
    both = cat([cond, uncond]) if cat is not None else None

    def pair(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if both is not None:
            out_cond, out_uncond = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
            return out_cond, out_uncond
        return denoiser(x_t, t, cond), denoiser(x_t, t, uncond)

    return _guided(pair, _conditional(denoiser, cond), scale, rescale, interval, sigma_at)


def autoguidance(
    denoiser: Callable[[Tensor, Tensor, Any], Tensor],
    guide: Callable[[Tensor, Tensor, Any], Tensor],
    cond: Any,
    scale: float,
    rescale: float = 0.0,
    interval: tuple[float, float] | None = None,
    sigma_at: Callable[[Tensor], Tensor] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself", eq. 2): the
    reference output is not the unconditional one but a weaker model's (`guide`: smaller and/or trained for less)
    with the *same* conditioning, ``out_guide + scale * (out - out_guide)``. It pushes the samples away from the
    errors the weaker model makes and the stronger one makes less, without the loss of diversity that classifier-free
    guidance pays for its gain in prompt alignment. The guide must share the latent space, the conditioning and the
    diffusion's parameterization. ``rescale`` and ``interval`` work as in `classifier_free_guidance`; ``scale == 1``
    is the plain call."""
    if scale == 1.0:
        _check(rescale, interval, sigma_at)
        return _conditional(denoiser, cond)

    def pair(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return denoiser(x_t, t, cond), guide(x_t, t, cond)

    return _guided(pair, _conditional(denoiser, cond), scale, rescale, interval, sigma_at)


def _check(rescale: float, interval: tuple[float, float] | None, sigma_at) -> None:
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    if interval is not None:
        lo, hi = (float(v) for v in interval)
        if not 0.0 <= lo < hi:
            raise ValueError(
                f"guidance interval must be (sigma_lo, sigma_hi) with 0 <= lo < hi, got {interval}"
            )
        if sigma_at is None:
            raise ValueError("a guidance interval needs sigma_at (the diffusion's sigma_at)")


def _conditional(denoiser: Callable, cond: Any) -> Callable[[Tensor, Tensor], Tensor]:
    def conditional(x_t: Tensor, t: Tensor) -> Tensor:
        return denoiser(x_t, t, cond)

    return conditional


def _guided(
    pair: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    conditional: Callable[[Tensor, Tensor], Tensor],
    scale: float,
    rescale: float,
    interval: tuple[float, float] | None,
    sigma_at: Callable[[Tensor], Tensor] | None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``ref + scale (out - ref)`` from ``pair(x_t, t) = (out, ref)``, rescaled, and only inside the interval."""
    _check(rescale, interval, sigma_at)
    lo, hi = (float(v) for v in interval) if interval is not None else (0.0, 0.0)

    def guided(x_t: Tensor, t: Tensor) -> Tensor:
        inside = None
        if interval is not None:
            sigma = sigma_at(t.reshape(-1).expand(x_t.shape[0]))
            inside = (sigma > lo) & (sigma <= hi)
            if not inside.any():
                return conditional(x_t, t)
        out_cond, out_ref = pair(x_t, t)
        out = out_ref + scale * (out_cond - out_ref)
        if rescale > 0:
            out = rescale_guidance(out, out_cond, rescale)
        if inside is not None and not inside.all():  # samples at different noise levels in one batch
            out = torch.where(inside.reshape(-1, *([1] * (out.ndim - 1))), out, out_cond)
        return out

    return guided


def rescale_guidance(out_cfg: Tensor, out_cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2024, eq. 15-16: match the per-sample std of the guided output to the conditional one's, by phi."""
    dims = tuple(range(1, out_cfg.ndim))
    rescaled = out_cfg * (out_cond.std(dim=dims, keepdim=True) / out_cfg.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * out_cfg
