"""Pretrained Stable Diffusion autoencoder weights → `KLAutoencoder` state dicts and constructor arguments.

Two source layouts exist:

- CompVis (`ldm/modules/diffusionmodules/model.py`; SD 1.x/2.x `model.ckpt`, `vae-ft-mse-840000-ema-pruned.ckpt`,
  or a full SD checkpoint under `first_stage_model.`). Our module names mirror it, so only wrappers go:
  the `first_stage_model.` prefix, the training loss (`loss.*`: LPIPS and the PatchGAN discriminator) and
  `model_ema.*` bookkeeping. Files converted back from diffusers may hold the attention projections as
  Linear (C, C) weights; ours are 1x1 convs (C, C, 1, 1).
- diffusers `AutoencoderKL` (`diffusion_pytorch_model.safetensors`): `down_blocks.{i}.resnets.{j}`,
  `mid_block.attentions.0.to_q` (older releases: `query/key/value/proj_attn`), `conv_shortcut` for
  `nin_shortcut`, `conv_norm_out` for `norm_out`, and decoder `up_blocks` numbered from the lowest
  resolution, the reverse of CompVis `up`.

Sources without `quant_conv`/`post_quant_conv` (diffusers `use_quant_conv=False`: SD3/Flux-style VAEs) get
identity 1x1 convs, which leaves their function unchanged.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ldm.models.autoencoder import KLAutoencoder

Layout = Literal["ldm", "compvis", "diffusers"]

WRAPPER_PREFIX = "first_stage_model."  # the autoencoder inside a full CompVis LatentDiffusion checkpoint
DROPPED_PREFIXES = ("loss.", "model_ema.")  # CompVis training loss (LPIPS, discriminator) and EMA bookkeeping
_ATTENTION_WEIGHT = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def _preview(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f", … ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def vae_entries(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """(the autoencoder's own entries, whether anything CompVis-specific was removed).

    A full SD checkpoint keeps only its `first_stage_model.` entries (prefix stripped; UNet, text encoder and
    EMA weights dropped); `loss.*` and `model_ema.*` entries go.
    """
    removed = False
    if any(k.startswith(WRAPPER_PREFIX) for k in state_dict):
        state_dict = {
            k[len(WRAPPER_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(WRAPPER_PREFIX)
        }
        removed = True
    kept = {k: v for k, v in state_dict.items() if not k.startswith(DROPPED_PREFIXES)}
    return kept, removed or len(kept) != len(state_dict)


def detect_layout(state_dict: Mapping[str, Tensor]) -> Layout:
    """ "diffusers", "compvis" (CompVis names plus wrappers/loss keys or Linear attention weights to convert) or
    "ldm" (already exactly our names and shapes); a ValueError for anything that is not a KL autoencoder."""
    entries, had_wrappers = vae_entries(state_dict)
    keys = entries.keys()
    if any(k.startswith(("encoder.down_blocks.", "encoder.mid_block.", "decoder.up_blocks.")) for k in keys):
        return "diffusers"
    if "encoder.conv_in.weight" in keys and any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        linear_attention = any(_ATTENTION_WEIGHT.fullmatch(k) and v.ndim == 2 for k, v in entries.items())
        return "compvis" if had_wrappers or linear_attention else "ldm"
    raise ValueError(
        "not a KL autoencoder state dict in CompVis or diffusers layout (expected keys such as "
        "'encoder.conv_in.weight' with 'encoder.down.*' or 'encoder.down_blocks.*'); "
        f"it has {len(state_dict)} entries, e.g. {_preview(state_dict)}"
    )


def _finish(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Linear attention weights → 1x1 conv weights; identity quant convs where the source has none."""
    out = {
        k: v[:, :, None, None] if _ATTENTION_WEIGHT.fullmatch(k) and v.ndim == 2 else v
        for k, v in state_dict.items()
    }
    if "quant_conv.weight" not in out and "encoder.conv_out.weight" in out:
        moments = out["encoder.conv_out.weight"].shape[0]  # 2 * latent channels
        out["quant_conv.weight"] = torch.eye(moments)[:, :, None, None]
        out["quant_conv.bias"] = torch.zeros(moments)
    if "post_quant_conv.weight" not in out and "decoder.conv_in.weight" in out:
        latent = out["decoder.conv_in.weight"].shape[1]
        out["post_quant_conv.weight"] = torch.eye(latent)[:, :, None, None]
        out["post_quant_conv.bias"] = torch.zeros(latent)
    return out


def compvis_to_ldm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CompVis AutoencoderKL (optionally inside a full SD checkpoint) → our names, which are the same."""
    return _finish(vae_entries(state_dict)[0])


_RESNET_PART = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_ATTENTION_PART = {
    "group_norm": "norm",
    "to_q": "q",
    "query": "q",
    "to_k": "k",
    "key": "k",
    "to_v": "v",
    "value": "v",
    "to_out.0": "proj_out",
    "proj_attn": "proj_out",
}
_P = r"\.(?P<p>weight|bias)"
_RES = r"\.(?P<part>norm1|conv1|norm2|conv2|conv_shortcut)" + _P
_DIFFUSERS_KEY = [
    re.compile(p)
    for p in (
        r"(?P<side>encoder|decoder)\.(?P<layer>conv_in|conv_out|conv_norm_out)" + _P,
        r"(?P<layer>quant_conv|post_quant_conv)" + _P,
        r"encoder\.down_blocks\.(?P<down>\d+)\.resnets\.(?P<j>\d+)" + _RES,
        r"encoder\.down_blocks\.(?P<down>\d+)\.downsamplers\.0\.conv" + _P,
        r"decoder\.up_blocks\.(?P<up>\d+)\.resnets\.(?P<j>\d+)" + _RES,
        r"decoder\.up_blocks\.(?P<up>\d+)\.upsamplers\.0\.conv" + _P,
        r"(?P<side>encoder|decoder)\.mid_block\.resnets\.(?P<mid>[01])" + _RES,
        r"(?P<side>encoder|decoder)\.mid_block\.attentions\.0\."
        r"(?P<attn>group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)" + _P,
    )
]


def _diffusers_key(key: str, num_up: int) -> str | None:
    for pattern in _DIFFUSERS_KEY:
        m = pattern.fullmatch(key)
        if m is None:
            continue
        g = m.groupdict()
        p = g["p"]
        if g.get("layer"):
            layer = "norm_out" if g["layer"] == "conv_norm_out" else g["layer"]
            return f"{g['side']}.{layer}.{p}" if g.get("side") else f"{layer}.{p}"
        if g.get("attn"):
            return f"{g['side']}.mid.attn_1.{_ATTENTION_PART[g['attn']]}.{p}"
        if g.get("mid") is not None:
            return f"{g['side']}.mid.block_{int(g['mid']) + 1}.{_RESNET_PART[g['part']]}.{p}"
        if g.get("down") is not None:
            level = f"encoder.down.{g['down']}"
        else:
            level = f"decoder.up.{num_up - 1 - int(g['up'])}"  # diffusers counts up_blocks from the lowest resolution
        if g.get("part"):
            return f"{level}.block.{g['j']}.{_RESNET_PART[g['part']]}.{p}"
        return f"{level}.{'downsample' if g.get('down') is not None else 'upsample'}.conv.{p}"
    return None


def diffusers_to_ldm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `AutoencoderKL` state dict → our names (a ValueError lists keys that have no counterpart)."""
    state_dict, _ = vae_entries(state_dict)
    up = [int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    num_up = max(up) + 1 if up else 0
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        new = _diffusers_key(key, num_up)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(
            f"{len(unknown)} diffusers AutoencoderKL keys have no KLAutoencoder counterpart: {_preview(unknown)}"
        )
    return _finish(out)


# the import maps above, inverted (where diffusers has two names for one of ours, the current one: listed first)
_TO_DIFFUSERS_RESNET = {ours: theirs for theirs, ours in _RESNET_PART.items()}
_TO_DIFFUSERS_ATTENTION = {ours: theirs for theirs, ours in reversed(_ATTENTION_PART.items())}
_LDM_KEY = re.compile(
    r"(?P<side>encoder|decoder)\.(?:(?P<io>conv_in|conv_out|norm_out)"
    r"|(?P<dir>down|up)\.(?P<level>\d+)\.(?:block\.(?P<j>\d+)\.(?P<part>\w+)|(?P<sample>downsample|upsample)\.conv)"
    r"|mid\.(?:block_(?P<mid>[12])\.(?P<mid_part>\w+)|attn_1\.(?P<attn>\w+)))" + _P
)


def ldm_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our `KLAutoencoder` state dict → diffusers `AutoencoderKL` names (the inverse of `diffusers_to_ldm`):
    the mid-block attention projections become Linear weights, decoder levels are counted from the lowest
    resolution."""
    up = [int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    num_up = max(up) + 1 if up else 0
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            out[key] = value
            continue
        m = _LDM_KEY.fullmatch(key)
        if m is None:
            unknown.append(key)
            continue
        g, side, p = m.groupdict(), m["side"], m["p"]
        if g["io"]:
            out[f"{side}.{'conv_norm_out' if g['io'] == 'norm_out' else g['io']}.{p}"] = value
        elif g["attn"]:
            name = _TO_DIFFUSERS_ATTENTION[g["attn"]]
            linear = p == "weight" and name != "group_norm"
            out[f"{side}.mid_block.attentions.0.{name}.{p}"] = value[:, :, 0, 0] if linear else value
        elif g["mid"]:
            part = _TO_DIFFUSERS_RESNET.get(g["mid_part"], g["mid_part"])
            out[f"{side}.mid_block.resnets.{int(g['mid']) - 1}.{part}.{p}"] = value
        else:
            level = int(g["level"]) if g["dir"] == "down" else num_up - 1 - int(g["level"])
            prefix = f"{side}.{g['dir']}_blocks.{level}"
            if g["sample"]:
                out[f"{prefix}.{g['sample']}rs.0.conv.{p}"] = value
            else:
                part = _TO_DIFFUSERS_RESNET.get(g["part"], g["part"])
                out[f"{prefix}.resnets.{g['j']}.{part}.{p}"] = value
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not KLAutoencoder entries: {_preview(unknown)}")
    return out


def diffusers_vae_config(
    config: Mapping, scaling_factor: float, shift_factor: float, sample_size: int
) -> dict:
    """diffusers `AutoencoderKL` keyword arguments (its config.json) for `KLAutoencoder(**config)`; the latent
    normalisation is diffusers' z_model = (z - shift_factor) * scaling_factor, the same as ours."""
    levels = len(config["channel_mult"])
    return {
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config["base_channels"] * m for m in config["channel_mult"]],
        "layers_per_block": config["num_res_blocks"],
        "latent_channels": config["latent_channels"],
        "norm_num_groups": config["num_groups"],
        "sample_size": sample_size,
        "scaling_factor": float(scaling_factor),
        "shift_factor": float(shift_factor) if shift_factor else None,
        "mid_block_add_attention": bool(config["mid_attention"]),
        "act_fn": "silu",
    }


def to_ldm(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Layout]:
    """Any supported layout → (our state dict, the source layout)."""
    layout = detect_layout(state_dict)
    converted = diffusers_to_ldm(state_dict) if layout == "diffusers" else compvis_to_ldm(state_dict)
    return converted, layout


def infer_autoencoder_config(state_dict: Mapping[str, Tensor], num_groups: int = 32) -> dict:
    """`KLAutoencoder` keyword arguments read off tensor shapes of a state dict in our layout.

    GroupNorm has no tensor that records its group count, so `num_groups` is passed through (SD: 32;
    diffusers' `config.json` calls it `norm_num_groups`).
    """
    missing = [
        k
        for k in ("encoder.conv_in.weight", "decoder.conv_out.weight", "encoder.conv_out.weight")
        if k not in state_dict
    ]
    if missing:
        raise ValueError(f"cannot infer the autoencoder's sizes: missing {_preview(missing)}")
    conv_in = state_dict["encoder.conv_in.weight"]  # (base, in_channels, 3, 3)
    base_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    if not levels or levels != list(range(len(levels))) or not blocks:
        raise ValueError(
            "cannot infer the autoencoder's levels: no contiguous 'encoder.down.{i}.block.{j}' entries"
        )
    channel_mult = []
    for i in levels:
        width = int(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0])
        if width % base_channels:
            raise ValueError(f"level {i} width {width} is not a multiple of the base width {base_channels}")
        channel_mult.append(width // base_channels)
    return {
        "in_channels": in_channels,
        "out_channels": int(state_dict["decoder.conv_out.weight"].shape[0]),
        "base_channels": base_channels,
        "channel_mult": channel_mult,
        "num_res_blocks": len(blocks),
        "latent_channels": int(state_dict["encoder.conv_out.weight"].shape[0]) // 2,
        "mid_attention": "encoder.mid.attn_1.q.weight" in state_dict,
        "dropout": 0.0,
        "num_groups": num_groups,
    }


def check_state_dict(state_dict: Mapping[str, Tensor], config: Mapping) -> None:
    """A ValueError naming a few missing, unexpected or misshapen entries unless `state_dict` fits
    `KLAutoencoder(**config)` exactly (checked on the meta device: no memory, no init)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in KLAutoencoder(**config).state_dict().items()}
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    misshapen = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k])}"
        for k in sorted(expected.keys() & state_dict.keys())
        if state_dict[k].shape != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_preview(unexpected)}")
    if misshapen:
        problems.append(f"wrong shape {len(misshapen)}: {_preview(misshapen, 3)}")
    if problems:
        raise ValueError(f"state dict does not fit KLAutoencoder({dict(config)}): " + "; ".join(problems))


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a `.safetensors` file, or of a torch file read as plain data (`weights_only=True`),
    unwrapped from a top-level `state_dict` entry (Lightning/CompVis checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} cannot be read as plain data (torch.load weights_only=True refused it: {e}); "
            "a checkpoint is data, never code: use a pruned or .safetensors copy of it"
        ) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of names to tensors)")
    return dict(obj)


def convert_state_dict(
    state_dict: Mapping[str, Tensor], num_groups: int = 32
) -> tuple[dict, dict[str, Tensor], Layout]:
    """(KLAutoencoder kwargs, float32 state dict that loads into it with strict=True, source layout)."""
    converted, layout = to_ldm(state_dict)
    converted = {k: v.float() if v.is_floating_point() else v for k, v in converted.items()}
    config = infer_autoencoder_config(converted, num_groups=num_groups)
    check_state_dict(converted, config)
    return config, converted, layout


def load_pretrained_vae(path: str | os.PathLike, num_groups: int = 32) -> tuple[dict, dict[str, Tensor]]:
    """(KLAutoencoder kwargs, state dict) from an SD VAE file in CompVis or diffusers layout
    (`.safetensors`, `.ckpt`, `.pt`, `.bin`)."""
    config, state_dict, _ = convert_state_dict(read_state_dict(path), num_groups=num_groups)
    return config, state_dict
