"""Frozen OpenCLIP text encoder: per-token hidden states (last or penultimate layer) + pooled embedding.

Stable Diffusion 2 conditions on the *penultimate* layer of OpenCLIP ViT-H-14's text tower, followed by the final
LayerNorm (Rombach et al., SD2 `FrozenOpenCLIPEmbedder`). Weights come from an open_clip pretrained tag, a local
weights file, or a `local-dir:` folder; with `pretrained=None` the tower is randomly initialised (tests, the CPU
quickstart), and its weights then travel inside the training checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

from ldm.conditioning.conditioning import Conditioning
from ldm.utils.weights import MissingWeightsError

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)  # makes our small towers (e.g. "ldm-tiny-text") known by name

LAYERS = ("last", "penultimate")


class FrozenOpenCLIPTextEncoder(nn.Module):
    def __init__(
        self,
        model_name: str = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        layer: str = "penultimate",
        context_length: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        self.model_name, self.pretrained, self.layer = model_name, pretrained, layer
        clip = _create_clip(model_name, pretrained, cache_dir)
        text = clip.text
        if getattr(text, "cls_emb", None) is not None:
            raise ValueError(f"{model_name}: text towers with a class token (CoCa) are not supported")
        self.text = text.requires_grad_(False).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        if context_length not in (None, self.text.context_length):
            raise ValueError(
                f"context_length={context_length}: the {model_name} text tower has position embeddings and a "
                f"causal mask for {self.text.context_length} tokens; leave it null (the tower's own)"
            )
        self.context_length = self.text.context_length
        self._null: Conditioning | None = None
        self._null_key: tuple | None = None

    @property
    def width(self) -> int:
        """Width of the per-token features (the UNet's cross-attention context_dim)."""
        return self.text.transformer.width

    @property
    def pooled_dim(self) -> int:
        proj = self.text.text_projection
        if proj is None:
            return self.width
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def identity(self) -> dict:
        """What a checkpoint records about the encoder it was trained with."""
        return {
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "layer": self.layer,
            "context_length": self.context_length,
            "width": self.width,
            "weights_in_checkpoint": self.pretrained is None,
        }

    def train(self, mode: bool = True) -> FrozenOpenCLIPTextEncoder:
        return super().train(False)  # frozen: dropout etc. stay off whatever the parent module does

    def tokenize(self, prompts: list[str]) -> Tensor:
        return self.tokenizer(list(prompts), context_length=self.context_length)

    def truncated(self, prompts: list[str]) -> Tensor:
        """(B,) bool: the prompts longer than the context (start and end tokens included), whose ends the
        tokenizer cuts off. (Tokenized one position longer: the last is filled exactly when they do not fit.)"""
        return self.tokenizer(list(prompts), context_length=self.context_length + 1)[:, -1] != 0

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Conditioning:
        device = self.text.token_embedding.weight.device
        ids = self.tokenize(prompts).to(device)  # (B, L)
        x, attn_mask = self.text._embeds(ids)  # (B, L, D)
        transformer = self.text.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        blocks = transformer.resblocks
        penultimate = None
        for i, block in enumerate(blocks):
            x = block(x, attn_mask=attn_mask)
            if i == len(blocks) - 2:
                penultimate = x
        if not transformer.batch_first:
            x = x.transpose(0, 1)
            penultimate = None if penultimate is None else penultimate.transpose(0, 1)
        last = self.text.ln_final(x)
        hidden = last if self.layer == "last" or penultimate is None else self.text.ln_final(penultimate)
        pooled = text_global_pool(
            last, ids, pool_type=self.text.pool_type, eos_token_id=getattr(self.text, "eos_id", None)
        )
        proj = self.text.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return Conditioning(tokens=hidden, pooled=pooled, mask=self._real_tokens(ids))

    def _real_tokens(self, ids: Tensor) -> Tensor:
        """(B, L) bool: start token, text and end token; not the padding after it. (Padding is id 0, which is
        also a real BPE token, "!" with no word end, so `ids != 0` would hide it.)"""
        eot = getattr(self.tokenizer, "eot_token_id", None)
        if eot is None:  # a Hugging Face tokenizer (e.g. SigLIP's): its own pad id
            pad = getattr(getattr(self.tokenizer, "tokenizer", None), "pad_token_id", None)
            return ids != (0 if pad is None else pad)
        is_end = ids == eot
        end = torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1), ids.shape[1] - 1)
        return torch.arange(ids.shape[1], device=ids.device) <= end[:, None]

    def null(self, batch_size: int = 1) -> Conditioning:
        """The empty-prompt conditioning used for classifier-free guidance, cached while the weights stay as they
        are (a load or any in-place change recomputes it), and computed in the tower's own precision: a first call
        under bf16 autocast must not fix a bf16 copy for the rest of the run."""
        weights = list(self.text.parameters())
        key = (weights[0].device, weights[0].dtype, tuple(p._version for p in weights))
        if self._null is None or self._null_key != key:
            with torch.autocast(weights[0].device.type, enabled=False):
                self._null = self([""])
            self._null_key = key
        return self._null.expand(batch_size)

    def _apply(self, fn, recurse: bool = True):
        self._null = None  # device/dtype change: recompute the cached null conditioning
        return super()._apply(fn, recurse)


def _create_clip(model_name: str, pretrained: str | None, cache_dir: str | None) -> nn.Module:
    # force_custom_text: the text tower becomes one `clip.text` module; plain-CLIP checkpoints are converted on load
    clip = create_openclip(model_name, pretrained, cache_dir, force_custom_text=True)
    if hasattr(clip, "visual"):
        del clip.visual  # only the text tower is used; frees the image tower's memory
    return clip


def create_openclip(
    model_name: str,
    pretrained: str | None,
    cache_dir: str | None = None,
    *,
    pretrained_key: str = "text_encoder.pretrained",
    model_key: str = "text_encoder.model_name",
    what: str = "OpenCLIP weights",
    force_custom_text: bool = False,
) -> nn.Module:
    """`open_clip.create_model` for offline machines: `pretrained` is a tag (from the local Hugging Face cache), a
    local file, or ignored for `model_name="local-dir:/path"` (the folder holds the weights). A tag that is unknown,
    or whose weights are not cached and cannot be downloaded, raises MissingWeightsError naming the file, where it
    comes from and the config keys (`pretrained_key`, `model_key`) that point at a local copy."""
    is_local_dir = model_name.startswith("local-dir:")
    is_tag = bool(pretrained) and not is_local_dir and not os.path.isfile(str(pretrained))
    if is_tag and not open_clip.get_pretrained_cfg(model_name, pretrained):
        known = open_clip.list_pretrained_tags_by_model(model_name)
        raise MissingWeightsError(
            f"{pretrained_key}={pretrained!r} is neither a local file nor a known open_clip tag for "
            f"{model_name} (known tags: {known})"
        )
    try:
        return open_clip.create_model(
            model_name,
            pretrained=None if is_local_dir else pretrained,
            cache_dir=cache_dir,
            force_custom_text=force_custom_text,
        )
    except (RuntimeError, OSError) as err:
        if is_tag:
            message = _missing_weights_message(
                model_name, str(pretrained), cache_dir, pretrained_key, model_key, what
            )
            raise MissingWeightsError(message) from err
        raise


def _missing_weights_message(
    model_name: str, tag: str, cache_dir: str | None, pretrained_key: str, model_key: str, what: str
) -> str:
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    repo, filename = os.path.split(cfg.get("hf_hub", ""))  # "org/name/" → the default file name
    filename = filename or "open_clip_model.safetensors (or open_clip_pytorch_model.bin)"
    source = f"Hugging Face repo '{repo}'" if repo else f"URL {cfg.get('url')}"
    hf_home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    return (
        f"Could not load {what} {model_name} / {tag!r}: they are not in the local cache and could not be "
        f"downloaded (offline machine?).\n"
        f"Missing file: {filename} from {source}.\n"
        f"Fix one of:\n"
        f"  - copy the file to this machine and set {pretrained_key}=/path/to/{filename.split(' ')[0]}\n"
        f"  - put open_clip_config.json + the weights in a folder and set {model_key}=local-dir:/path/to/folder\n"
        f"  - pre-populate the Hugging Face cache ({cache_dir or os.path.join(hf_home, 'hub')}) on a machine with network"
    )
