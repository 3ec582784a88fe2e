"""CLIP score of a checkpoint's samples: `python eval/clip_score.py ckpt=… prompts=captions.txt`.

CLIP score (Hessel et al. 2021, "CLIPScore", eq. 1, with w = 100 as torchmetrics and most text-to-image papers
report it): the mean over image–caption pairs of 100 · max(cos(E_I(image), E_T(caption)), 0).

`ClipScore` is a torchmetrics `Metric` (sums in float64, reduced over processes). Its OpenCLIP model (image and
text towers) is made offline like the text encoder's: an open_clip pretrained tag (from the local Hugging Face
cache, or downloaded when online), a local weights file, or `local-dir:/folder` (open_clip_config.json + weights).
The default, OpenAI's ViT-L/14, is the model of torchmetrics' `CLIPScore`; open_clip names it
`ViT-L-14-quickgelu` / `openai` (plain `ViT-L-14` would run those weights with the wrong activation).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchvision.transforms.v2 import functional as TF

if __name__ == "__main__":  # `python eval/clip_score.py`: import the repository's `eval` package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from ldm.conditioning.openclip import create_openclip  # also registers ldm's small configs ("ldm-tiny-text")

log = logging.getLogger(__name__)

DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-L-14-quickgelu", "openai"


def create_clip_model(model_name: str, pretrained: str | None, cache_dir: str | None = None) -> nn.Module:
    """An OpenCLIP model with both towers, frozen, loaded offline as the text encoder is (`create_openclip`).
    `pretrained=None` (random weights) is allowed only as an explicit choice, for tests."""
    model = create_openclip(
        model_name,
        pretrained,
        cache_dir,
        pretrained_key="clip_pretrained",
        model_key="clip_model",
        what="the CLIP-score model's weights",
    )
    if not pretrained and not model_name.startswith("local-dir:"):
        log.warning("CLIP model %s is randomly initialised: its scores mean nothing (tests only)", model_name)
    return model.requires_grad_(False).eval()


class ClipScore(Metric):
    """Mean of 100 · max(cos(image, caption), 0); images uint8 or float in [0, 1], any size.

    Images are preprocessed as open_clip's eval transform does for PIL images: shorter side resized to the
    model's input size (the model's interpolation, bicubic for most; antialiased), centre crop, the model's mean/std.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    score_sum: Tensor
    count: Tensor

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        pretrained: str | None = DEFAULT_PRETRAINED,
        cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name, self.pretrained = model_name, pretrained
        self.clip = create_clip_model(model_name, pretrained, cache_dir)
        self.tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        pp = self.clip.visual.preprocess_cfg
        size = pp.get("size", self.clip.visual.image_size)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean, self.std = tuple(pp["mean"]), tuple(pp["std"])
        self.squash = pp.get("resize_mode") == "squash"
        # open_clip's rule (`image_transform`): "bilinear" (MobileCLIP, PE, …) or else bicubic
        self.interpolation = "bilinear" if pp.get("interpolation") == "bilinear" else "bicubic"
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def identity(self) -> dict:
        return {
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "image_size": list(self.image_size),
            "preprocess": ("resize to" if self.squash else "shorter side to")
            + f" the input size ({self.interpolation}, antialiased), centre crop, CLIP mean/std",
            "score": "mean of 100 * max(cos(image, caption), 0) (Hessel et al. 2021, w = 100)",
        }

    def preprocess(self, images: Tensor) -> Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        size = list(self.image_size) if self.squash else [min(self.image_size)]  # [n]: the shorter side → n
        mode = (
            TF.InterpolationMode.BILINEAR
            if self.interpolation == "bilinear"
            else TF.InterpolationMode.BICUBIC
        )
        x = TF.resize(x, size, interpolation=mode, antialias=True)
        x = TF.center_crop(x, list(self.image_size)).clamp(0, 1)
        return TF.normalize(x, list(self.mean), list(self.std))

    @torch.no_grad()
    def scores(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        """Per-pair scores (B,), float64."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        device = self.score_sum.device
        image_emb = self.clip.encode_image(self.preprocess(images.to(device)))
        text_emb = self.clip.encode_text(self.tokenizer(list(captions)).to(device))
        cos = (F.normalize(image_emb.double(), dim=-1) * F.normalize(text_emb.double(), dim=-1)).sum(-1)
        return 100 * cos.clamp_min(0)

    def update(self, images: Tensor, captions: Sequence[str]) -> None:
        scores = self.scores(images, captions)
        self.score_sum += scores.sum()
        self.count += len(scores)

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            raise ValueError("no images were scored")
        return self.score_sum / self.count


def main() -> None:
    from eval.runner import cli

    cli("eval_clip")


if __name__ == "__main__":
    main()
