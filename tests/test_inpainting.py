"""Inpainting-specialised UNets: the random training masks, the extra input channels, and what the model learns
from them."""

from __future__ import annotations

import pytest
import torch

from ldm.data.masks import KINDS, InpaintMasks, inpainting_input
from ldm.diffusion import GaussianDiffusion
from ldm.inference import is_inpainting_unet, unet_denoiser
from ldm.models import CrossAttentionUNet


def _tiny_unet(in_channels: int = 9, out_channels: int = 4, channels: int = 32) -> CrossAttentionUNet:
    return CrossAttentionUNet(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=channels,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[2],
        head_dim=16,
        context_dim=8,
        num_groups=8,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_each_mask_kind(kind):
    g = torch.Generator().manual_seed(0)
    masks = InpaintMasks()
    for height, width in ((8, 8), (16, 24), (3, 5)):
        for _ in range(20):
            m = masks.draw(kind, height, width, g)
            assert m.shape == (1, height, width) and set(m.unique().tolist()) <= {0.0, 1.0}
            assert m.sum() > 0  # something to generate
            if kind == "full":
                assert m.all()
                continue
            assert m.sum() < m.numel()  # something to keep
            if kind == "border":
                # the union of the four edge bands that the mask's own extents imply is the mask
                rows, cols = m[0].all(1), m[0].all(0)
                top = int(torch.cumprod(rows.int(), 0).sum())
                bottom = int(torch.cumprod(rows.flip(0).int(), 0).sum())
                left = int(torch.cumprod(cols.int(), 0).sum())
                right = int(torch.cumprod(cols.flip(0).int(), 0).sum())
                bands = torch.zeros(height, width)
                bands[:top], bands[height - bottom :], bands[:, :left], bands[:, width - right :] = 1, 1, 1, 1
                assert torch.equal(bands, m[0]) and top + bottom + left + right > 0
            if kind == "box":
                assert m.sum() <= 3 * 0.7 * height * 0.7 * width + 3 * (height + width + 1)


def test_mask_kinds_follow_their_probabilities_and_seeds():
    masks = InpaintMasks(full=0.1, box=0.2, stroke=0.3, border=0.4)
    kinds = masks.kinds(4000, torch.Generator().manual_seed(0))
    for kind, p in masks.probs.items():
        assert abs(kinds.count(kind) / 4000 - p) < 0.03, (kind, kinds.count(kind))
    a = masks(6, 8, 8, torch.Generator().manual_seed(3))
    b = masks(6, 8, 8, torch.Generator().manual_seed(3))
    assert a.shape == (6, 1, 8, 8) and torch.equal(a, b)
    assert InpaintMasks(full=1, box=0, stroke=0, border=0)(4, 8, 8).all()
    with pytest.raises(ValueError, match="probabilities"):
        InpaintMasks(full=0, box=0, stroke=0, border=0)
    with pytest.raises(ValueError, match="unknown mask kind"):
        masks.draw("circle", 8, 8)


def test_inpainting_input_and_denoiser_concat():
    z = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 4:] = 1
    extra = inpainting_input(z, mask)
    assert extra.shape == (2, 5, 8, 8)
    assert torch.equal(extra[:, :1], mask) and torch.equal(extra[:, 1:, :, :4], z[..., :4])
    assert (extra[:, 1:, :, 4:] == 0).all()

    torch.manual_seed(0)
    unet = _tiny_unet().eval()
    for module in unet.modules():  # zero-initialised output layers would hide what reaches the network
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.2)
    assert is_inpainting_unet(unet) and not is_inpainting_unet(_tiny_unet(in_channels=4))
    from ldm.conditioning import Conditioning

    cond = Conditioning(torch.randn(2, 3, 8))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    out = unet_denoiser(unet, extra)(x, t, cond)
    ref = unet(torch.cat([x, extra], 1), t, cond.tokens)
    torch.testing.assert_close(out, ref)
    # classifier-free guidance's doubled batch [uncond; cond] gets the same extra channels in both halves
    doubled = unet_denoiser(unet, extra)(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([cond, cond]))
    torch.testing.assert_close(doubled, torch.cat([ref, ref]), rtol=1e-4, atol=1e-5)
    other = inpainting_input(z + 1, mask)
    assert not torch.allclose(unet_denoiser(unet, other)(x, t, cond), out)


@pytest.mark.slow
def test_an_inpainting_unet_learns_to_keep_the_known_latents():
    """Latents of independent N(0, 1) cells: at the noisiest step nothing but the extra channels tells a cell's
    value, so after training the x0 estimate must be close to z0 where kept (MSE << 1) and near the prior mean 0
    where generated (MSE ~ 1) — the mask and masked latents reach the network and are used."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(schedule="cosine", prediction="v")
    unet = _tiny_unet(channels=32)
    masks = InpaintMasks(full=0.0, box=1.0, stroke=0.0, border=1.0)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    context = torch.zeros(32, 1, 8)
    from ldm.conditioning import Conditioning

    cond = Conditioning(context)
    for _ in range(150):
        z0 = torch.randn(32, 4, 8, 8)
        denoise = unet_denoiser(unet, inpainting_input(z0, masks(32, 8, 8)))
        loss = diffusion.loss(lambda x, t, d=denoise: d(x, t, cond), z0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    with torch.no_grad():
        z0 = torch.randn(32, 4, 8, 8)
        mask = masks(32, 8, 8, torch.Generator().manual_seed(1))
        t = torch.full((32,), diffusion.num_timesteps - 1)
        x_t = diffusion.q_sample(z0, t, torch.randn_like(z0))
        x0 = diffusion.to_x0_eps(unet_denoiser(unet, inpainting_input(z0, mask))(x_t, t, cond), x_t, t)[0]
    err = (x0 - z0) ** 2
    kept = mask.expand_as(err) == 0
    assert err[kept].mean() < 0.2, err[kept].mean()
    assert err[~kept].mean() > 0.7, err[~kept].mean()
