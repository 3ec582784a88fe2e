"""Review of inpainting masks and init_from: a narrow canvas still keeps something, and a shape mismatch under
init_from is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.data.masks import InpaintMasks
from ldm.training.init_from import load_init_weights


def test_masks_on_a_one_wide_canvas_keep_and_generate():
    """The fallback of a kind that cannot be drawn (a border at width 1 often covers everything) must still keep
    a cell, as on any other canvas."""
    g = torch.Generator().manual_seed(0)
    for height, width in ((4, 1), (1, 4)):
        for _ in range(200):
            m = InpaintMasks().draw("border", height, width, g)
            assert 0 < m.sum() < m.numel(), (height, width, m.flatten().tolist())


class _Unet(nn.Module):
    def __init__(self, in_channels: int = 4, out: int = 4):
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(in_channels, 8, 3))])
        self.out = nn.Linear(8, out)


class _Ema(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.register_buffer("num_updates", torch.tensor(0))


class _Module(nn.Module):
    """What load_init_weights reads of a diffusion module: unet, ema, codec.scale/shift."""

    def __init__(self, in_channels: int = 4, out: int = 4):
        super().__init__()
        self.unet = _Unet(in_channels, out)
        self.ema = _Ema(_Unet(in_channels, out))
        self.codec = nn.Module()
        self.codec.register_buffer("scale", torch.tensor(float("nan")))
        self.codec.register_buffer("shift", torch.tensor(0.0))


def test_init_from_carries_weights_ema_and_scale_and_widens_the_input_conv():
    torch.manual_seed(0)
    src = _Module()
    measured = 0.4321  # a latent scale the source run measured: it must come along, not be reset
    src.codec.scale.fill_(measured)
    src.ema.num_updates.fill_(7)
    dst = _Module(in_channels=9)
    load_init_weights(dst, {"state_dict": src.state_dict()}, "t2i.ckpt")
    assert int(dst.ema.num_updates) == 7 and float(dst.codec.scale) == pytest.approx(measured)
    for unet, ref in ((dst.unet, src.unet), (dst.ema.module, src.ema.module)):
        w = unet.input_blocks[0][0].weight
        assert torch.equal(w[:, :4], ref.input_blocks[0][0].weight) and not w[:, 4:].any()
        x = torch.randn(2, 4, 6, 6)
        extra = torch.randn(2, 5, 6, 6)  # whatever the mask and masked latents hold
        torch.testing.assert_close(
            unet.input_blocks[0][0](torch.cat([x, extra], 1)), ref.input_blocks[0][0](x)
        )


def test_init_from_refuses_a_shape_mismatch_naming_the_checkpoint():
    src = _Module(out=4)
    with pytest.raises(ValueError, match=r"init_from=small\.ckpt.*unet\.out\.weight \(4, 8\).*\(6, 8\)"):
        load_init_weights(_Module(out=6), {"state_dict": src.state_dict()}, "small.ckpt")
