"""Building the parts from a (resolved) config, and checking a config before anything heavy runs.

The one place besides the entry points and `ldm.training.run` that knows about Hydra/OmegaConf. Every config
group node carries a `_target_`, a typed constructor; `check_config` fails early, with the key and the accepted
names, when a node sets a key that its constructor does not take (a typo in an experiment, say).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf


def cpu_has_bf16() -> bool:
    """The CPU computes bf16 natively (x86 AVX512-BF16 or AMX, Arm BF16): autocast to bf16 is then faster than
    fp32 there, rather than emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = {word for line in f if line.startswith(("flags", "Features")) for word in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _auto_precision(cpu: str = "32-true") -> str:
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    if cpu == "bf16-mixed" and not cpu_has_bf16():
        return "32-true"
    return cpu


def register_resolvers() -> None:
    """`${ldm_precision:}` → bf16-mixed on a GPU that has bf16, else 32-true. `${ldm_precision:bf16-mixed}` also
    autocasts to bf16 on a CPU with native bf16 arithmetic (`cpu_has_bf16`)."""
    if not OmegaConf.has_resolver("ldm_precision"):
        OmegaConf.register_new_resolver("ldm_precision", _auto_precision)


register_resolvers()


def as_config(cfg: Mapping | DictConfig) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def to_plain(cfg: DictConfig | Mapping) -> dict:
    """Resolved config as plain Python containers (safe for `torch.load(weights_only=True)`)."""
    return OmegaConf.to_container(as_config(cfg), resolve=True, throw_on_missing=False)


def import_target(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"_target_ {path!r} cannot be imported: {err}") from err


def accepted_parameters(target: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """(parameters, takes arbitrary keywords) of a constructor. A class whose `__init__` passes `**kwargs` on to
    its base classes accepts what they accept, so their parameters are collected along the MRO."""
    params: dict[str, inspect.Parameter] = {}
    for owner in inspect.getmro(target) if inspect.isclass(target) else (target,):
        init = owner.__init__ if inspect.isclass(target) else owner
        if inspect.isclass(target) and "__init__" not in vars(owner):
            continue
        own = inspect.signature(init).parameters
        params.update({k: v for k, v in own.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)})
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values()):
            return params, False
    return params, True


def check_config(cfg: DictConfig | Mapping, where: str = "") -> None:
    """Every `_target_` node: the target imports, and each key is a parameter of its constructor."""
    if isinstance(cfg, DictConfig | Mapping):
        keys = list(cfg.keys())
        if "_target_" in keys:
            params, takes_kwargs = accepted_parameters(import_target(cfg["_target_"]))
            if not takes_kwargs:
                for key in keys:
                    if key.startswith("_") or key in params:
                        continue
                    near = difflib.get_close_matches(key, list(params), n=1)
                    hint = f"; did you mean {near[0]!r}?" if near else ""
                    raise ValueError(
                        f"config {where or '<root>'}: {key!r} is not a parameter of {cfg['_target_']} "
                        f"(accepted: {', '.join(p for p in params if p != 'self')}){hint}"
                    )
        for key in keys:
            value = cfg._get_node(key) if isinstance(cfg, DictConfig) else cfg[key]
            if isinstance(value, DictConfig | ListConfig | Mapping | list):
                check_config(value, f"{where}.{key}" if where else str(key))
    elif isinstance(cfg, ListConfig | list):
        for i, item in enumerate(cfg):
            check_config(item, f"{where}[{i}]")


def build_text_encoder(cfg: Mapping):
    return instantiate(as_config(cfg).text_encoder)


def build_autoencoder(cfg: Mapping):
    return instantiate(as_config(cfg).autoencoder)


def build_denoising_parts(cfg: Mapping, text_encoder=None) -> dict:
    """unet (its context width taken from the text encoder, its channels from the autoencoder when null: C in and
    out, 2 C + 1 in for an inpainting stage), text encoder, diffusion."""
    cfg = as_config(cfg)
    text_encoder = text_encoder if text_encoder is not None else build_text_encoder(cfg)
    unet_kwargs = {}
    for key in ("in_channels", "out_channels"):  # null: the autoencoder's latent channels
        if cfg.unet.get(key) is None:
            unet_kwargs[key] = cfg.autoencoder.latent_channels
    if cfg.unet.get("in_channels") is None and (cfg.get("stage") or {}).get("inpainting_masks") is not None:
        unet_kwargs["in_channels"] = 2 * cfg.autoencoder.latent_channels + 1  # x_t, mask, masked latents
    if cfg.unet.get("context_dim") is None:
        unet_kwargs["context_dim"] = text_encoder.width
    if cfg.unet.get("pooled_dim", None) == "auto":
        unet_kwargs["pooled_dim"] = text_encoder.pooled_dim
    return {
        "unet": instantiate(cfg.unet, **unet_kwargs),
        "text_encoder": text_encoder,
        "diffusion": instantiate(cfg.diffusion),
    }
