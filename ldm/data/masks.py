"""Random inpainting masks for training an inpainting-specialised UNet (1 = generate, 0 = keep).

Stable Diffusion's inpainting models were trained on LaMa-style masks (Suvorov et al. 2022: thick random strokes
and boxes) and, for a quarter of the samples, a mask covering everything, so the model still does plain
text-to-image. Border masks (one or more sides of the canvas, SD's outpainting use) are drawn as a kind of their
own here, so outpainting is in the training distribution and not only an extrapolation.

Masks are drawn directly at the resolution asked for, in practice the latent grid (a cached-latent pipeline has
no pixels). Each kind's geometry is given in fractions of the canvas so the same settings serve every size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KINDS: tuple[str, ...] = ("full", "box", "stroke", "border")


class InpaintMasks:
    """Draws (B, 1, H, W) float masks in {0, 1}, each of one kind, picked with the given probabilities.

    full: everything is generated (text-to-image). box: 1–3 axis-aligned rectangles, each side 10–70 % of the
    canvas. stroke: 1–4 thick poly-lines of 2–5 segments (brush strokes; width 5–20 % of the shorter side).
    border: 1–4 sides, each 10–50 % of the canvas deep (outpainting). Every kind but `full` keeps at least one
    cell, and every mask generates at least one.
    """

    def __init__(self, full: float = 0.25, box: float = 0.3, stroke: float = 0.25, border: float = 0.2):
        weights = {"full": full, "box": box, "stroke": stroke, "border": border}
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"mask kind probabilities must be >= 0 and not all 0, got {weights}")
        total = sum(weights.values())
        self.probs = {kind: w / total for kind, w in weights.items()}

    def __repr__(self) -> str:
        return f"InpaintMasks({', '.join(f'{k}={v:.2f}' for k, v in self.probs.items())})"

    def kinds(self, batch: int, generator: torch.Generator | None = None) -> list[str]:
        probs = torch.tensor([self.probs[k] for k in KINDS])
        return [KINDS[i] for i in torch.multinomial(probs, batch, replacement=True, generator=generator)]

    def __call__(
        self,
        batch: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        masks = torch.stack(
            [self.draw(kind, height, width, generator) for kind in self.kinds(batch, generator)]
        )
        return masks.to(device)

    def draw(self, kind: str, height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
        """One (1, H, W) mask of the given kind."""
        if kind not in KINDS:
            raise ValueError(f"unknown mask kind {kind!r}; valid: {', '.join(KINDS)}")
        if kind == "full":
            return torch.ones(1, height, width)
        for _ in range(16):  # a draw that keeps nothing or generates nothing is drawn again
            mask = getattr(self, f"_{kind}")(height, width, generator)
            if 0 < mask.sum() < mask.numel():
                return mask
        # tiny canvases: fall back to the left half (one column wide: the top half)
        mask = torch.zeros(1, height, width)
        if width > 1:
            mask[..., : width // 2] = 1
        else:
            mask[:, : max(1, height // 2)] = 1
        return mask

    @staticmethod
    def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    def _box(self, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        mask = torch.zeros(1, height, width)
        for _ in range(int(torch.randint(1, 4, (), generator=generator))):
            h = max(1, round(self._uniform(0.1, 0.7, generator) * height))
            w = max(1, round(self._uniform(0.1, 0.7, generator) * width))
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            mask[:, top : top + h, left : left + w] = 1
        return mask

    def _stroke(self, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        ys = torch.arange(height, dtype=torch.float32).view(-1, 1) + 0.5
        xs = torch.arange(width, dtype=torch.float32).view(1, -1) + 0.5
        mask = torch.zeros(height, width, dtype=torch.bool)
        for _ in range(int(torch.randint(1, 5, (), generator=generator))):
            radius = max(0.5, self._uniform(0.05, 0.2, generator) * min(height, width) / 2)
            y, x = self._uniform(0, height, generator), self._uniform(0, width, generator)
            for _ in range(int(torch.randint(2, 6, (), generator=generator))):
                angle = self._uniform(0, 2 * math.pi, generator)
                length = self._uniform(0.1, 0.5, generator) * max(height, width)
                y2 = min(max(y + length * math.sin(angle), 0.0), float(height))
                x2 = min(max(x + length * math.cos(angle), 0.0), float(width))
                mask |= _segment_distance(ys, xs, (y, x), (y2, x2)) <= radius
                y, x = y2, x2
        return mask.float().unsqueeze(0)

    def _border(self, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        mask = torch.zeros(1, height, width)
        sides = torch.randperm(4, generator=generator)[: int(torch.randint(1, 5, (), generator=generator))]
        for side in sides.tolist():
            extent = height if side in (0, 1) else width
            depth = max(1, round(self._uniform(0.1, 0.5, generator) * extent))
            if side == 0:
                mask[:, :depth] = 1
            elif side == 1:
                mask[:, height - depth :] = 1
            elif side == 2:
                mask[:, :, :depth] = 1
            else:
                mask[:, :, width - depth :] = 1
        return mask


def _segment_distance(ys: Tensor, xs: Tensor, a: tuple[float, float], b: tuple[float, float]) -> Tensor:
    """Distance of every pixel centre (ys: (H, 1), xs: (1, W)) to the segment a–b."""
    (ay, ax), (by, bx) = a, b
    dy, dx = by - ay, bx - ax
    length2 = dy * dy + dx * dx
    if length2 == 0:
        return torch.hypot(ys - ay, xs - ax)
    u = (((ys - ay) * dy + (xs - ax) * dx) / length2).clamp(0, 1)
    return torch.hypot(ys - (ay + u * dy), xs - (ax + u * dx))


def inpainting_input(latents: Tensor, mask: Tensor) -> Tensor:
    """The extra UNet input channels of an inpainting model: [mask, latents with the generated region zeroed],
    (B, 1 + C, h, w). A zeroed cell is near the latents' mean only when the shift is their mean (the default shift
    is 0); the mask channel is what tells the network which cells to generate."""
    return torch.cat([mask, latents * (1 - mask)], dim=1)
