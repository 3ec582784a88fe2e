"""Stage-1 loss against independent float64 write-ups of the references (CompVis `LPIPSWithDiscriminator`,
taming `vqperceptual` / `NLayerDiscriminator`, richzhang LPIPS), and its numerics under bf16."""

from __future__ import annotations

import pytest
import torch

from ldm.models import KLAutoencoder
from ldm.models.autoencoder import DiagonalGaussian
from ldm.models.lpips import LPIPS, SLICE_ENDS
from ldm.training.autoencoder_loss import AutoencoderLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def kl64(parameters: torch.Tensor) -> torch.Tensor:
    """CompVis `DiagonalGaussianDistribution.kl`, in float64: ½ Σ_chw (μ² + σ² − 1 − log σ²)."""
    mean, logvar = parameters.double().chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


# ---------------------------------------------------------------- KL under bf16


def test_kl_of_bf16_posterior_is_summed_in_fp32():
    """An encoder run under bf16 autocast hands the posterior bf16 (mean, logvar). The KL over an SD-size latent
    (4x32x32) is a sum of thousands of terms: summed in bf16 (CPU autocast keeps exp/pow/sum in bf16) it is
    rounded to 8 significant bits, ±64 at 2e4; in fp32 it is the float64 value of the same bf16 inputs."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 4, 32, 32, generator=g) * 3
    logvar = torch.randn(2, 4, 32, 32, generator=g) - 8
    parameters = torch.cat([mean, logvar], dim=1).bfloat16()
    expected = kl64(parameters)
    assert expected.min() > 1e4
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            kl = DiagonalGaussian(parameters).kl()
        assert kl.dtype == torch.float32
        torch.testing.assert_close(kl.double(), expected, rtol=1e-6, atol=0.0)


def test_generator_loss_kl_under_cpu_bf16_autocast():
    """`GeneratorLoss.kl` (logged as train/kl, weighted into the loss) under bf16 autocast equals CompVis' KL,
    Σ KL / B, of the posterior the autoencoder produced, written out in float64."""
    torch.manual_seed(0)
    ae = KLAutoencoder(
        base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, mid_attention=False
    )
    loss_fn = AutoencoderLoss(discriminator=None, lpips=None)
    x = images(batch=2, size=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ae(x, generator=torch.Generator().manual_seed(0))
        g = loss_fn.generator_loss(x, out.reconstruction, out.posterior, global_step=0)
    assert out.posterior.parameters.dtype == torch.bfloat16  # the case under test
    expected = kl64(out.posterior.parameters).sum() / x.shape[0]
    torch.testing.assert_close(g.kl.double(), expected, rtol=1e-6, atol=0.0)


# ---------------------------------------------------------------- LPIPS, written out as richzhang's


def test_lpips_is_richzhang_s_formula_in_float64():
    """richzhang `LPIPS.forward` with the same backbone and heads: ScalingLayer ((x − shift) / scale, inputs in
    [-1, 1]), unit-normalised channels (eps 1e-10 outside the sqrt there, 1e-8 inside here: equal to 1e-6 on
    VGG-sized features), 1x1 heads on squared differences, spatial mean, sum over the five layers."""
    torch.manual_seed(0)
    lpips = LPIPS(pretrained=False).double()
    with torch.no_grad():
        for head in lpips.heads:  # non-uniform heads, as the trained ones
            head.weight.uniform_(0.0, 0.1)
    x, y = images(seed=1).double(), images(seed=2).double()
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    layers = [m for block in lpips.slices for m in block]
    assert len(layers) == SLICE_ENDS[-1]
    hx, hy, expected = (x - shift) / scale, (y - shift) / scale, torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for start, end, head in zip((0, *SLICE_ENDS[:-1]), SLICE_ENDS, lpips.heads):
            for layer in layers[start:end]:
                hx, hy = layer(hx.clone()), layer(hy.clone())
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = head.weight.view(1, -1, 1, 1)
            expected += ((nx - ny).pow(2) * w).sum(1).mean(dim=(1, 2))
        got = lpips(x, y)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
