"""`init_from=<checkpoint>`: a new run starts from another run's trained weights (progressive resolution, an
inpainting UNet from a text-to-image one), without its optimizer, step counter or data position."""

from __future__ import annotations

import logging

import lightning as L
import torch

from ldm.utils.checkpoint import submodule_state

log = logging.getLogger(__name__)


def load_init_weights(module: L.LightningModule, ckpt: dict, path: str) -> None:
    """The trained weights of `ckpt`: stage 2's UNet, EMA (with its update count) and latent scale/shift (the
    latent space the UNet learnt), stage 1's autoencoder and discriminator; not the frozen text encoder. Modules
    this run adds (new parameters) keep their initialisation; shapes must match. A weights-only checkpoint has
    the EMA UNet alone: the trained UNet starts from it too."""
    state = dict(ckpt["state_dict"])
    if not any(k.startswith("unet.") for k in state):
        state.update({"unet." + k: v for k, v in submodule_state(state, "ema.module").items()})
        if any(k.startswith("unet.") for k in state):
            log.info("init_from=%s: a weights-only checkpoint; the UNet starts from its EMA weights", path)
    prefixes = ("unet.", "ema.", "codec.scale", "codec.shift", "autoencoder.", "loss.discriminator.")
    wanted = {k: v for k, v in state.items() if k.startswith(prefixes)}
    own = module.state_dict()
    for key in [k for k in wanted if k.endswith(_UNET_INPUT_CONV) and k in own]:
        wanted[key] = _widen_input_conv(wanted[key], own[key], key)
    unexpected = sorted(k for k in wanted if k not in own)
    if unexpected:
        raise ValueError(f"init_from={path} has weights this model lacks: {', '.join(unexpected[:5])} …")
    misshapen = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in sorted(wanted.items())
        if v.shape != own[k].shape
    ]
    if misshapen:
        raise ValueError(
            f"init_from={path} has weights of other shapes than this model's: {', '.join(misshapen[:5])}"
        )
    module.load_state_dict(wanted, strict=False)
    new = sorted(k for k in own if k.startswith(prefixes) and k not in wanted)
    log.info(
        "init_from=%s: %d tensors loaded; %d new, left as initialised: %s",
        path,
        len(wanted),
        len(new),
        new[:5],
    )


_UNET_INPUT_CONV = "input_blocks.0.0.weight"


def _widen_input_conv(weight: torch.Tensor, target: torch.Tensor, key: str) -> torch.Tensor:
    """A text-to-image UNet's first convolution, given the extra input channels of an inpainting UNet (mask and
    masked latents) as zero weights, as Stable Diffusion's inpainting models were started: the widened network
    computes exactly what the original did until training moves the new weights."""
    if weight.shape == target.shape:
        return weight
    if (
        weight.shape[0] != target.shape[0]
        or weight.shape[2:] != target.shape[2:]
        or weight.shape[1] > target.shape[1]
    ):
        raise ValueError(
            f"init_from: {key} has shape {tuple(weight.shape)}, this model {tuple(target.shape)}"
        )
    widened = torch.zeros_like(target)
    widened[:, : weight.shape[1]] = weight
    log.info(
        "init_from: %s widened from %d to %d input channels (new ones zero)",
        key,
        weight.shape[1],
        target.shape[1],
    )
    return widened
