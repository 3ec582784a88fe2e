"""`CrossAttentionUNet` weights ↔ the two layouts the rest of the field reads: CompVis and diffusers.

- **CompVis** (`openaimodel.UNetModel`, the `model.diffusion_model.*` part of an SD 1.x/2.x single-file checkpoint,
  which ComfyUI, AUTOMATIC1111 and diffusers' `from_single_file` load): our block structure is theirs, so only the
  residual blocks' inner names differ (`norm1/conv1/temb_proj/norm2/conv2/nin_shortcut` ↔
  `in_layers.0/in_layers.2/emb_layers.1/out_layers.0/out_layers.3/skip_connection`) and a downsampler's conv is
  called `op`.
- **diffusers** (`UNet2DConditionModel`): `input_blocks` become `conv_in` + `down_blocks.{level}.resnets/attentions/
  downsamplers`, `output_blocks` become `up_blocks` (numbered from the lowest resolution, as ours), the middle block
  `mid_block.resnets.0/attentions.0/resnets.1`; residual blocks say `time_emb_proj` and `conv_shortcut`. The
  pooled-text projection (`pooled_dim`) is diffusers' `class_embed_type="simple_projection"` (one Linear whose output
  is added to the timestep embedding): call that UNet with `class_labels=pooled`.

The map is read off a built UNet's modules, so it follows any depth, width or attention placement. Both layouts
assume one GroupNorm group count everywhere (SD: 32); `check_exportable` refuses UNets whose narrow layers fell
back to fewer groups, and UNets with SDXL-style micro-conditioning (no counterpart in either layout) or, for
CompVis, a pooled-text projection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import Tensor, nn

from ldm.models.attention import SpatialTransformer
from ldm.models.layers import Downsample, ResnetBlock, Upsample
from ldm.models.unet import _UNET_NORM_EPS, CrossAttentionUNet

UnetLayout = Literal["compvis", "diffusers"]
UNET_LAYOUTS = ("compvis", "diffusers")
COMPVIS_UNET_PREFIX = "model.diffusion_model."  # the UNet inside a CompVis LatentDiffusion checkpoint

_RESNET_NAMES: dict[str, dict[str, str]] = {
    "compvis": {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "temb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "nin_shortcut": "skip_connection",
    },
    "diffusers": {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut"},
}


def group_counts(module: nn.Module) -> set[int]:
    """The distinct GroupNorm group counts inside `module`."""
    return {m.num_groups for m in module.modules() if isinstance(m, nn.GroupNorm)}


def check_exportable(unet: CrossAttentionUNet, layout: UnetLayout) -> int:
    """The UNet's one GroupNorm group count; a ValueError saying why `unet` has no exact twin in `layout`."""
    if layout not in UNET_LAYOUTS:
        raise ValueError(f"unknown UNet layout {layout!r}; valid: {', '.join(UNET_LAYOUTS)}")
    if unet.micro_proj is not None:
        raise ValueError(
            "this UNet was trained with micro_conditioning (SDXL-style size/crop inputs through one Linear); "
            f"{layout} has no layer that computes the same, so it cannot be exported exactly"
        )
    if layout == "compvis" and unet.pooled_proj is not None:
        raise ValueError(
            "this UNet adds a projection of the pooled text embedding to its timestep embedding (pooled_dim); "
            "the SD single-file (CompVis) layout has no such layer: export it in diffusers layout instead "
            "(class_embed_type='simple_projection', called with class_labels=pooled)"
        )
    groups = group_counts(unet)
    if len(groups) != 1:
        narrow = sorted(
            f"{m.num_channels} channels → {m.num_groups} groups"
            for m in unet.modules()
            if isinstance(m, nn.GroupNorm) and m.num_groups != max(groups)
        )
        raise ValueError(
            f"this UNet's GroupNorms use {sorted(groups)} groups (the group count falls back to a divisor of a "
            f"narrow width: {', '.join(sorted(set(narrow))[:3])}); {layout} models use one count everywhere. "
            "Train with widths divisible by unet.num_groups (or a smaller num_groups) to export it"
        )
    if layout == "compvis" and groups != {32}:
        raise ValueError(
            f"this UNet's GroupNorms have {groups.pop()} groups; CompVis' openaimodel (and the SD loaders) always "
            "use 32: export it in diffusers layout (norm_num_groups) instead"
        )
    return groups.pop()


def _module_names(unet: CrossAttentionUNet, layout: UnetLayout) -> dict[str, tuple[str, str]]:
    """our module path → (its path in `layout`, kind: resnet / down / other)."""
    names: dict[str, tuple[str, str]] = {}

    def add(ours: str, module: nn.Module, theirs: str) -> None:
        kind = (
            "resnet" if isinstance(module, ResnetBlock) else "down" if isinstance(module, Downsample) else ""
        )
        names[ours] = (theirs, kind)

    if layout == "compvis":
        for path, module in unet.named_modules():
            if isinstance(module, ResnetBlock | Downsample):
                add(path, module, path)
        return names

    names["time_embed.0"] = ("time_embedding.linear_1", "")
    names["time_embed.2"] = ("time_embedding.linear_2", "")
    names["pooled_proj"] = ("class_embedding", "")
    names["input_blocks.0.0"] = ("conv_in", "")
    names["out.0"] = ("conv_norm_out", "")
    names["out.2"] = ("conv_out", "")
    level, j = 0, 0
    for i, block in enumerate(unet.input_blocks):
        if i == 0:
            continue
        if isinstance(block[0], Downsample):
            add(f"input_blocks.{i}.0", block[0], f"down_blocks.{level}.downsamplers.0")
            level, j = level + 1, 0
            continue
        for k, layer in enumerate(block):
            part = "resnets" if isinstance(layer, ResnetBlock) else "attentions"
            add(f"input_blocks.{i}.{k}", layer, f"down_blocks.{level}.{part}.{j}")
        j += 1
    for k, theirs in enumerate(("resnets.0", "attentions.0", "resnets.1")):
        add(f"middle_block.{k}", unet.middle_block[k], f"mid_block.{theirs}")
    per_level = len(unet.output_blocks) // len(unet.channel_mult)  # num_res_blocks + 1
    for b, block in enumerate(unet.output_blocks):
        level, j = divmod(b, per_level)
        for k, layer in enumerate(block):
            if isinstance(layer, Upsample):
                theirs = f"up_blocks.{level}.upsamplers.0"
            else:
                part = "resnets" if isinstance(layer, ResnetBlock) else "attentions"
                theirs = f"up_blocks.{level}.{part}.{j}"
            add(f"output_blocks.{b}.{k}", layer, theirs)
    return names


def unet_key_map(unet: CrossAttentionUNet, layout: UnetLayout) -> dict[str, str]:
    """Each key of `unet.state_dict()` → its name in `layout` (without the `model.diffusion_model.` prefix)."""
    check_exportable(unet, layout)
    modules = _module_names(unet, layout)
    renames = _RESNET_NAMES[layout]
    out: dict[str, str] = {}
    for key in unet.state_dict():
        owner = max((m for m in modules if key.startswith(m + ".")), key=len, default=None)
        if owner is None:
            out[key] = (
                key  # same name in both (CompVis: all but the residual blocks' and downsamplers' insides)
            )
            continue
        theirs, kind = modules[owner]
        rest = key[len(owner) + 1 :]
        head, _, param = rest.rpartition(".")
        if kind == "resnet":
            head = renames.get(head, head)
        elif kind == "down" and layout == "compvis":
            head = "op"
        out[key] = f"{theirs}.{head}.{param}" if head else f"{theirs}.{param}"
    if len(set(out.values())) != len(out):
        raise AssertionError("UNet key map is not one-to-one")  # a bug in this file, not in the weights
    return out


def unet_to_layout(
    state_dict: Mapping[str, Tensor], unet: CrossAttentionUNet, layout: UnetLayout
) -> dict[str, Tensor]:
    """Our UNet state dict (of the architecture `unet`) → the same tensors under `layout`'s names."""
    key_map = unet_key_map(unet, layout)
    _check_keys(state_dict.keys(), key_map.keys(), "ldm")
    return {key_map[k]: v for k, v in state_dict.items()}


def unet_from_layout(
    state_dict: Mapping[str, Tensor], unet: CrossAttentionUNet, layout: UnetLayout
) -> dict[str, Tensor]:
    """A `layout` state dict (CompVis entries may keep their `model.diffusion_model.` prefix) → our names for the
    architecture `unet`; a ValueError lists missing and unknown keys."""
    if layout == "compvis" and any(k.startswith(COMPVIS_UNET_PREFIX) for k in state_dict):
        state_dict = {
            k[len(COMPVIS_UNET_PREFIX) :]: v
            for k, v in state_dict.items()
            if k.startswith(COMPVIS_UNET_PREFIX)
        }
    inverse = {theirs: ours for ours, theirs in unet_key_map(unet, layout).items()}
    _check_keys(state_dict.keys(), inverse.keys(), layout)
    return {inverse[k]: v for k, v in state_dict.items()}


def _check_keys(have, expected, layout: str) -> None:
    missing, unknown = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
    if missing or unknown:
        raise ValueError(
            f"{layout} UNet state dict does not fit the architecture: {len(missing)} missing "
            f"({', '.join(missing[:4])}), {len(unknown)} unknown ({', '.join(unknown[:4])})"
        )


def unet_layer_config(unet: CrossAttentionUNet) -> dict:
    """The numbers both layouts' configs are made of, read off a built UNet."""
    transformers = [m for m in unet.modules() if isinstance(m, SpatialTransformer)]
    attn = [m.transformer_blocks[0].attn1 for m in transformers]
    head_dims = {a.to_q.out_features // a.heads for a in attn}
    per_level = len(unet.output_blocks) // len(unet.channel_mult)
    attention_levels = []
    for level in range(len(unet.channel_mult)):
        block = unet.output_blocks[(len(unet.channel_mult) - 1 - level) * per_level]
        attention_levels.append(any(isinstance(layer, SpatialTransformer) for layer in block))
    widths = [unet.model_channels * m for m in unet.channel_mult]
    if len(head_dims) == 1:  # head_dim= (SD2): heads = width / head_dim at every level
        head_dim, num_heads = head_dims.pop(), None
        heads = [w // head_dim for w in widths]
    else:  # num_heads= (SD1): the same head count at every level
        head_dim, num_heads = None, attn[0].heads
        heads = [num_heads] * len(widths)
    return {
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "model_channels": unet.model_channels,
        "channel_mult": list(unet.channel_mult),
        "num_res_blocks": per_level - 1,
        "attention_levels": attention_levels,  # per level, from full resolution down
        "head_dim": head_dim,
        "num_heads": num_heads,
        "heads": heads,  # per level
        "transformer_depth": len(transformers[0].transformer_blocks),
        "context_dim": unet.context_dim,
        "pooled_dim": None if unet.pooled_proj is None else unet.pooled_proj.in_features,
    }


def diffusers_unet_config(unet: CrossAttentionUNet, sample_size: int) -> dict:
    """`UNet2DConditionModel` keyword arguments (its config.json) for the same network as `unet`.

    sample_size: the latent side the model was trained at (diffusers' default generation size ÷ VAE factor)."""
    groups = check_exportable(unet, "diffusers")
    c = unet_layer_config(unet)
    widths = [c["model_channels"] * m for m in c["channel_mult"]]
    return {
        "sample_size": sample_size,
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "down_block_types": [("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in c["attention_levels"]],
        "up_block_types": [
            ("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in reversed(c["attention_levels"])
        ],
        "block_out_channels": widths,
        "layers_per_block": c["num_res_blocks"],
        # diffusers' attention_head_dim is a head count per level (a historical misnomer)
        "attention_head_dim": c["heads"],
        "cross_attention_dim": c["context_dim"],
        "transformer_layers_per_block": c["transformer_depth"],
        "use_linear_projection": True,
        "norm_num_groups": groups,
        "norm_eps": _UNET_NORM_EPS,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "upcast_attention": False,
        **(
            {
                "class_embed_type": "simple_projection",
                "projection_class_embeddings_input_dim": c["pooled_dim"],
            }
            if c["pooled_dim"]
            else {}
        ),
    }


def compvis_unet_params(unet: CrossAttentionUNet, image_size: int) -> dict:
    """`openaimodel.UNetModel` params (an SD inference yaml's `unet_config.params`) for the same network."""
    check_exportable(unet, "compvis")
    c = unet_layer_config(unet)
    return {
        "use_checkpoint": False,
        "use_fp16": False,
        "image_size": image_size,
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "model_channels": c["model_channels"],
        "attention_resolutions": [2**level for level, a in enumerate(c["attention_levels"]) if a],
        "num_res_blocks": c["num_res_blocks"],
        "channel_mult": c["channel_mult"],
        **(
            {"num_head_channels": c["head_dim"]}
            if c["head_dim"]
            else {"num_heads": c["num_heads"], "num_head_channels": -1}
        ),
        "use_linear_in_transformer": True,
        "transformer_depth": c["transformer_depth"],
        "context_dim": c["context_dim"],
        "legacy": False,
    }
