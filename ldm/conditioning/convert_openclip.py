"""A frozen OpenCLIP text tower as the files transformers reads: `CLIPTextModel` weights + config, `CLIPTokenizer`.

This is how Stability shipped SD2's OpenCLIP ViT-H-14 tower to diffusers, and what `ldm.export` writes for a diffusers
folder. A model that also conditions on the pooled text embedding gets the whole tower with its projection as a
`CLIPTextModelWithProjection` instead (`text_embeds` = ldm's pooled). Pure conversion of names and shapes: transformers
is not imported (it reads the files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def hf_clip_text(
    identity: Mapping, state: Mapping[str, Tensor], with_projection: bool = False
) -> tuple[dict, dict[str, Tensor]]:
    """(transformers `CLIPTextModel` config, its state dict) for an OpenCLIP text tower (`identity` as a checkpoint
    records it, `state` its weights without the `text.` prefix): the blocks SD's conditioning layer uses
    (penultimate: all but the last), then the final LayerNorm; the packed attention in-projection split into q/k/v.

    `with_projection`: a `CLIPTextModelWithProjection` instead, with every block and the text projection, so that its
    `text_embeds` is the tower's pooled embedding (final LayerNorm of the last layer at the end token, projected), as
    `FrozenOpenCLIPTextEncoder` computes it; the penultimate layer's tokens are then `final_layer_norm(
    hidden_states[-2])` (diffusers' clip_skip=1). A tower without a projection gets the identity.

    A ValueError for towers CLIPTextModel computes differently: non-causal attention, layer scale or other extra
    weights (any tensor left unconverted); with the projection also a projection bias, or pooling other than at the
    end token."""
    text_cfg, quick_gelu = openclip_text_cfg(identity["model_name"], identity.get("pretrained"))
    if text_cfg.get("no_causal_mask"):
        raise ValueError(
            f"{identity['model_name']}'s text tower attends without a causal mask; CLIPTextModel is causal"
        )
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")})
    used = blocks[:-1] if identity["layer"] == "penultimate" and not with_projection else blocks
    width = state["token_embedding.weight"].shape[1]
    sources = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
    out: dict[str, Tensor] = {}
    read = set()
    for i in used:
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            sources.update({f"{dst}{theirs}.{p}": f"{src}{ours}.{p}" for ours, theirs in names.items()})
            packed = f"{src}attn.in_proj_{p}"
            q, k, v = state[packed].chunk(3)
            out.update(
                {
                    f"{dst}self_attn.q_proj.{p}": q,
                    f"{dst}self_attn.k_proj.{p}": k,
                    f"{dst}self_attn.v_proj.{p}": v,
                }
            )
            read.add(packed)
    out.update({theirs: state[ours] for theirs, ours in sources.items()})
    read |= set(sources.values())
    # open_clip's projection: a (width, embed) Parameter applied as `x @ proj`, or an nn.Linear (`proj_bias`)
    projection = state.get("text_projection", state.get("text_projection.weight"))
    if projection is not None and projection.ndim == 2 and "text_projection" in state:
        projection = projection.T  # (width, embed) → nn.Linear's (embed, width)
    if with_projection:
        _check_end_token_pooling(identity["model_name"], text_cfg)
        if "text_projection.bias" in state:
            raise ValueError(
                f"{identity['model_name']}'s text projection has a bias; CLIPTextModelWithProjection's has none"
            )
        if projection is None:  # no projection: pooled is the end token's features themselves
            projection = torch.eye(width, dtype=state["token_embedding.weight"].dtype)
        out["text_projection.weight"] = projection.contiguous()
        read |= {"text_projection", "text_projection.weight"}
    unused_block = f"transformer.resblocks.{blocks[-1]}." if len(used) < len(blocks) else None
    unused_projection = {"text_projection", "text_projection.weight", "text_projection.bias"}
    left = sorted(
        k
        for k in state
        if k not in read and k not in unused_projection and not (unused_block and k.startswith(unused_block))
    )
    if left:
        raise ValueError(
            f"{identity['model_name']}'s text tower has weights CLIPTextModel has no place for ({', '.join(left[:4])}): "
            "it would compute something else, so it is not exported"
        )
    config = {
        "_name_or_path": f"ldm export of OpenCLIP {identity['model_name']} ({identity.get('pretrained') or 'trained from scratch'})",
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": state["token_embedding.weight"].shape[0],
        "hidden_size": width,
        "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "projection_dim": width if projection is None else projection.shape[0],
        "num_hidden_layers": len(used),
        "num_attention_heads": int(text_cfg.get("heads", width // 64)),  # open_clip's default head width: 64
        "max_position_embeddings": state["positional_embedding"].shape[0],
        "hidden_act": "quick_gelu" if quick_gelu else "gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "pad_token_id": 0,  # open_clip pads with 0 ("!")
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "torch_dtype": "float32",
    }
    return config, out


def _check_end_token_pooling(model_name: str, text_cfg: Mapping) -> None:
    """CLIPTextModel pools at the first end token (id 49407, its config's eos_token_id); open_clip's default "argmax"
    pooling (the highest id: the end token, the last in CLIP's BPE vocabulary) and "eos" pooling on that id do the
    same. Anything else (first or last position, no pooling) it cannot compute."""
    pool_type = text_cfg.get("pool_type", "argmax")
    eos_id = text_cfg.get("eos_id", 2)  # open_clip's TextTransformer default
    if pool_type == "argmax" or (pool_type == "eos" and eos_id == 49407):
        return
    raise ValueError(
        f"{model_name}'s text tower pools with pool_type={pool_type!r}"
        + (f" on eos_id={eos_id}" if pool_type == "eos" else "")
        + "; CLIPTextModelWithProjection pools at the end token (49407), so its text_embeds would differ"
    )


def openclip_text_cfg(model_name: str, pretrained: str | None = None) -> tuple[dict, bool]:
    """(the tower's open_clip text_cfg, whether it uses QuickGELU): what no tensor records (head count, causal
    mask, activation), from the registered model config or a local-dir folder's open_clip_config.json, and the
    pretrained tag's own settings (OpenAI's weights use QuickGELU)."""
    import open_clip

    from ldm.conditioning import openclip  # noqa: F401  (registers the project's own tower configs)

    if model_name.startswith("local-dir:"):  # a folder with open_clip_config.json + weights
        config_file = Path(model_name.removeprefix("local-dir:")) / "open_clip_config.json"
        cfg = json.loads(config_file.read_text(encoding="utf-8")).get("model_cfg")
    else:
        cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"no open_clip config for text tower {model_name!r}: cannot tell its head count")
    quick_gelu = bool(cfg.get("quick_gelu"))
    if pretrained and not model_name.startswith("local-dir:") and not os.path.isfile(str(pretrained)):
        quick_gelu = quick_gelu or bool(
            (open_clip.get_pretrained_cfg(model_name, pretrained) or {}).get("quick_gelu")
        )
    return cfg.get("text_cfg", {}), quick_gelu


def write_clip_tokenizer(folder: Path, identity: dict, max_length: int) -> None:
    """CLIPTokenizer files with open_clip's BPE vocabulary (the one both CLIP and OpenCLIP use)."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(identity["model_name"])
    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        raise ValueError(
            f"{identity['model_name']} uses a {type(tokenizer).__name__}, not CLIP's BPE tokenizer: "
            "the diffusers export writes CLIPTokenizer files only"
        )
    folder.mkdir(parents=True, exist_ok=True)
    # open_clip names its start/end tokens <start_of_text>/<end_of_text>; CLIP's (and transformers') are these
    renamed = {tokenizer.sot_token_id: "<|startoftext|>", tokenizer.eot_token_id: "<|endoftext|>"}
    vocab = {renamed.get(i, token): i for token, i in tokenizer.encoder.items()}
    _write_json(folder / "vocab.json", vocab)
    merges = sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])
    lines = ["#version: 0.2", *(" ".join(pair) for pair, _ in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "!",
    }
    _write_json(folder / "special_tokens_map.json", special)
    context = identity.get("context_length") or max_length
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": int(context),
            "do_lower_case": True,
            **special,
        },
    )
