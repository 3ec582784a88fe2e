"""DINOv2 features for FD_DINOv2 and precision / recall, loaded offline from Meta's weight files.

Stein et al. (NeurIPS 2023, "Exposing flaws of generative model evaluation metrics") found that the Fréchet distance
in the feature space of DINOv2 ViT-L/14 agrees with human judgement of diffusion samples far better than Inception's
FID; EDM2 (Karras et al. 2024) reports FD_DINOv2 next to FID. Their reference code, dgm-eval and EDM2's
`calculate_metrics.py`, call `torch.hub.load("facebookresearch/dinov2", "dinov2_vitl14")`, which needs the repository's
code from GitHub as well as the weights. Here the same network is built from timm's ViT (an installed dependency of
open_clip) and Meta's unchanged `dinov2_vitl14_pretrain.pth`, found offline like every weight file of ldm.

What must match the hub model, and does (tests/test_dinov2.py checks it against an independent forward pass):

- the feature is the final-LayerNorm'd class token (`x_norm_clstoken`, 1024-d for ViT-L/14);
- the weights hold a 37×37 position grid (518 px); at 224 px the hub model resizes it on every call with
  `interpolate(scale_factor=(16 + 0.1) / 37, mode="bicubic")` (no antialias; the 0.1 is DINO's historical offset).
  timm would resample to exactly 16×16 by size, which gives other embeddings, so the grid is resized here once,
  the hub's way, when the weights are loaded.

How images reach 224×224 is a recorded choice, as for Inception:

- "torch" (default): bicubic with antialias on 8-bit values in float (EDM2's `resize_mode='torch'`);
- "pil": PIL bicubic on the 8-bit RGB image, rounded back to 8 bits (dgm-eval, EDM2's `resize_mode='pil'`).

Then x/255, normalised with the ImageNet mean and standard deviation.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from eval.fid import FeatureScorer
from ldm.utils.checkpoint import file_sha256
from ldm.utils.weights import MissingWeightsError, find_weights

DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
INPUT_SIZE, PATCH_SIZE, HEAD_DIM = 224, 14, 64  # every DINOv2 ViT has 64-d attention heads
INTERPOLATE_OFFSET = 0.1  # DINO's offset in the position-grid scale factor (facebookresearch/dino#8)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_PROTOCOLS = {
    "torch": "bicubic with antialias on 8-bit values in float32 (EDM2 calculate_metrics, resize_mode='torch')",
    "pil": "PIL bicubic on the 8-bit RGB image, rounded to 8 bits (dgm-eval; EDM2 resize_mode='pil')",
}
_NAMES = {
    (384, 12): "ViT-S/14",
    (768, 12): "ViT-B/14",
    (1024, 24): "ViT-L/14",
}  # ViT-g/14 (SwiGLU): not supported


def find_dinov2_weights(path: str | os.PathLike | None = None) -> Path:
    """Meta's DINOv2 weights: `path` if given, else the torch hub cache (where `torch.hub.load` keeps them)."""
    return find_weights(
        None if path is None else str(path),
        DINOV2_FILE,
        DINOV2_URL,
        what="DINOv2 ViT-L/14 (FD_DINOv2)",
        config_key="dinov2_weights",
    )


def load_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """Meta's `.pth` (as torch hub keeps it), or timm's `model.safetensors` of `vit_large_patch14_dinov2.lvd142m`
    (the same tensors under the same names, less the mask token). Data only: `weights_only` / safetensors."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def architecture(state: dict[str, Tensor]) -> dict:
    """Width, depth and position grid of a DINOv2 state dict in Meta's layout (dinov2_vit*14_pretrain.pth)."""
    if "register_tokens" in state:
        raise ValueError(
            "DINOv2 with registers (…_reg4_pretrain.pth) is not the FD_DINOv2 network: use the plain one"
        )
    if any(".mlp.w12." in k for k in state):
        raise ValueError("DINOv2 ViT-g/14 (SwiGLU MLP) is not supported: FD_DINOv2 uses ViT-L/14")
    missing = [
        k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight") if k not in state
    ]
    if missing:
        raise ValueError(f"not a DINOv2 state dict in Meta's layout: no {missing}")
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    if state["patch_embed.proj.weight"].shape[-1] != PATCH_SIZE or dim % HEAD_DIM:
        raise ValueError(f"expected patch size {PATCH_SIZE} and a width divisible by {HEAD_DIM}")
    return {"embed_dim": dim, "depth": depth, "num_heads": dim // HEAD_DIM, "grid": grid}


def hub_position_grid(pos_embed: Tensor, grid: int) -> Tensor:
    """The position embeddings the hub model adds at `grid`×`grid` patches: the trained grid resized by the scale
    factor (grid + 0.1) / trained grid, bicubic, without antialias; the class token's embedding unchanged."""
    trained = math.isqrt(pos_embed.shape[1] - 1)
    if trained == grid:
        return pos_embed
    cls, patches = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    scale = (grid + INTERPOLATE_OFFSET) / trained
    patches = F.interpolate(
        patches.reshape(1, trained, trained, -1).permute(0, 3, 1, 2),
        scale_factor=(scale, scale),
        mode="bicubic",
    )
    if patches.shape[-2:] != (grid, grid):
        raise AssertionError(f"resized grid {tuple(patches.shape[-2:])}, expected {grid}×{grid}")
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1).to(pos_embed.dtype)


def build_network(state: dict[str, Tensor], image_size: int = INPUT_SIZE) -> nn.Module:
    """timm's ViT with DINOv2's shape, holding `state` (Meta's layout) with the hub's position grid at `image_size`.
    Its output is the normalised class token."""
    from timm.models.vision_transformer import VisionTransformer

    arch = architecture(state)
    net = VisionTransformer(
        img_size=image_size,
        patch_size=PATCH_SIZE,
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        mlp_ratio=4.0,
        qkv_bias=True,
        init_values=1.0,  # LayerScale present (its values come from the weights)
        num_classes=0,
        global_pool="token",
    )
    weights = {k: v for k, v in state.items() if k != "mask_token"}  # masked-token training only
    weights["pos_embed"] = hub_position_grid(weights["pos_embed"], image_size // PATCH_SIZE)
    net.load_state_dict(weights, strict=True)
    return net


class DINOv2Features(nn.Module):
    """uint8 images (B, 3, H, W) of any size → (B, D) DINOv2 class-token features, with the chosen resize."""

    def __init__(self, weights: str | os.PathLike | None = None, resize: str = "torch") -> None:
        super().__init__()
        if resize not in RESIZE_PROTOCOLS:
            raise ValueError(f"dinov2_resize must be one of {list(RESIZE_PROTOCOLS)}, got {resize!r}")
        self.resize = resize
        self.weights_path = find_dinov2_weights(weights)
        try:
            state = load_state(self.weights_path)
        except Exception as err:
            raise MissingWeightsError(
                f"dinov2_weights={self.weights_path} is not a readable state dict like {DINOV2_FILE}: {err}"
            ) from err
        self.arch = architecture(state)
        self.net = build_network(state).requires_grad_(False).eval()
        self.sha256 = file_sha256(self.weights_path)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return self.arch["embed_dim"]

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def identity(self) -> dict:
        """What a result records about the extractor (and what keys the reference-statistics cache)."""
        name = _NAMES.get((self.dim, self.arch["depth"]), "custom size")
        return {
            "network": f"DINOv2 {name} (timm ViT, Meta's weights, the torch hub model's position grid)",
            "weights_file": self.weights_path.name,
            "weights_sha256": self.sha256,
            "architecture": {k: self.arch[k] for k in ("embed_dim", "depth", "num_heads")},
            "resize": self.resize,
            "resize_method": RESIZE_PROTOCOLS[self.resize],
            "input_size": INPUT_SIZE,
            "features": f"final-norm class token ({self.dim})",
        }

    def train(self, mode: bool = True) -> DINOv2Features:
        return super().train(False)

    def to_input(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) → normalised float (B, 3, 224, 224)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if self.resize == "pil":
            x = torch.from_numpy(pil_resize(images, INPUT_SIZE)).to(self.device, torch.float32)
        else:
            x = F.interpolate(
                images.to(self.device, torch.float32),
                size=(INPUT_SIZE, INPUT_SIZE),
                mode="bicubic",
                antialias=True,
            )
        return (x / 255 - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net(self.to_input(images)).float()


def pil_resize(images: Tensor, size: int) -> np.ndarray:
    """dgm-eval's resize: each image as an 8-bit PIL RGB image, bicubic to size×size; uint8 (B, 3, size, size)."""
    out = np.empty((images.shape[0], 3, size, size), dtype=np.uint8)
    for i, image in enumerate(images.cpu().permute(0, 2, 3, 1).numpy()):
        resized = Image.fromarray(image, "RGB").resize((size, size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(resized).transpose(2, 0, 1)
    return out


def save_random_dinov2_weights(
    path: str | os.PathLike, embed_dim: int = 128, depth: int = 2, grid: int = 37, seed: int = 0
) -> Path:
    """A random DINOv2 state dict in Meta's layout (mask token, `grid`² + 1 positions), for tests and smoke runs.

    LayerScale is set to 1 so that the blocks matter. Metrics computed with it are not comparable to anything;
    results record the weights' hash and architecture."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    net = VisionTransformer(
        img_size=grid * PATCH_SIZE,
        patch_size=PATCH_SIZE,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // HEAD_DIM,
        qkv_bias=True,
        init_values=1.0,
        num_classes=0,
    )
    state = net.state_dict()
    for key in ("cls_token", "pos_embed"):
        state[key] = torch.randn_like(state[key]) * 0.5
    state["mask_token"] = torch.zeros(1, embed_dim)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


class DINOv2Scorer(FeatureScorer):
    """FD_DINOv2 and precision / recall in DINOv2 space."""

    def compute(self) -> dict:
        """All processes must call (torchmetrics gathers); the values are the same on each."""
        distance, features, _, precision, recall = self._compute()
        return {
            "fd_dinov2": distance,
            "precision_dinov2": precision,
            "recall_dinov2": recall,
            "num_images": len(features),
        }

    def protocol(self) -> dict:
        return {**self._protocol(), "fd": "Fréchet distance of the features, float64 (Stein et al. 2023)"}
