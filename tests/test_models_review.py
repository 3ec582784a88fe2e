"""Numerics of the network modules that the weight-conversion tests (float32 parity) do not reach: 16-bit precision,
initialisation, timestep-embedding convention, masking against diffusers, channels_last, torch.compile, activation
checkpointing with dropout, and the posterior against diffusers' DiagonalGaussianDistribution."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.embeddings import get_timestep_embedding

from ldm.models import CrossAttentionUNet, DiagonalGaussian, KLAutoencoder
from ldm.models.attention import CrossAttention, SpatialTransformer
from ldm.models.convert_unet import diffusers_unet_config, unet_to_layout
from ldm.models.layers import ResnetBlock, group_norm, timestep_embedding

from .test_models import TINY_UNET, TINY_VAE

pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed_unet(**kwargs) -> CrossAttentionUNet:
    """The tiny UNet with its zero-initialised layers given random weights, so every path carries signal."""
    torch.manual_seed(0)
    unet = CrossAttentionUNet(**{**TINY_UNET, **kwargs}).eval()
    with torch.no_grad():
        for p in unet.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.05)
    return unet


def unet_inputs(batch=2, size=(8, 8), length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    t = torch.tensor([7, 815])[:batch]
    context = torch.randn(batch, length, 128, generator=g)
    return x, t, context


def test_timestep_embedding_is_sd_convention():
    """openaimodel's [cos | sin], max_period 10000, frequencies exp(-ln(1e4) i / half): diffusers'
    flip_sin_to_cos=True, downscale_freq_shift=0 (every SD 1.x/2.x/XL UNet config), fp32, zero pad for odd dims."""
    t = torch.tensor([0, 1, 17, 999.0, 500.5, 0.25])
    for dim in (320, 256, 7):
        ours = timestep_embedding(t, dim)
        assert ours.dtype == torch.float32
        theirs = get_timestep_embedding(
            t, dim, flip_sin_to_cos=True, downscale_freq_shift=0, max_period=10000
        )
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    config = diffusers_unet_config(CrossAttentionUNet(**TINY_UNET), sample_size=8)
    assert config["flip_sin_to_cos"] is True and config["freq_shift"] == 0


def test_unet_embeds_timesteps_in_fp32_before_casting_to_bf16_weights():
    """Timestep 815 in bf16 would be 816 (bf16 integers are exact only up to 256): the sinusoid must see fp32 t."""
    unet = perturbed_unet().to(torch.bfloat16)
    seen = []
    unet.time_embed[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x, t, context = unet_inputs()
    unet(x.bfloat16(), t.float() + 0.5, context.bfloat16())
    expected = timestep_embedding(t.float() + 0.5, TINY_UNET["model_channels"]).bfloat16()
    assert seen[0].dtype == torch.bfloat16 and torch.equal(seen[0], expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_softmax_is_fp32_accurate_in_16_bit(dtype):
    """SD2's upcast_attention (CompVis _ATTN_PRECISION="fp32"): logits of thousands, far past what a 16-bit
    softmax resolves. `F.scaled_dot_product_attention` computes the softmax in fp32 in every backend (flash and
    memory-efficient kernels accumulate in fp32; the math backend upcasts 16-bit inputs since torch 2.5), so there
    is no option to honour: the attention output is the float64 attention of the same 16-bit q, k, v to a few
    units in the last place, where a softmax in `dtype` is off by far more."""
    torch.manual_seed(0)
    attn = CrossAttention(64, 48, heads=2, dim_head=32)
    u = F.normalize(torch.randn(48), dim=0)
    with torch.no_grad():  # values blind to the shared key direction u, so they stay O(1)
        attn.to_v.weight.sub_(attn.to_v.weight @ u[:, None] * u)
    attn = attn.to(dtype)
    # every key shares a large component: logits in the thousands, yet only O(10) apart for each query
    x, context = (torch.randn(2, 16, 64) * 16).to(dtype), (torch.randn(2, 9, 48) + 1000 * u).to(dtype)
    captured = []
    attn.to_out.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    attn(x, context)

    def heads(t):  # (B, N, H*D) → (B, H, N, D)
        return t.unflatten(-1, (2, 32)).transpose(1, 2)

    q, k, v = (
        heads(attn.to_q(x)),
        heads(attn.to_k(context)),
        heads(attn.to_v(context)),
    )  # 16-bit, as the module's
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(32)
    spread = logits.amax(-1) - logits.amin(-1)
    assert logits.abs().max() > 1000 and spread.median() < 30  # 16-bit logits lose the differences
    ref = (torch.softmax(logits, dim=-1) @ v.double()).transpose(1, 2).flatten(2)
    err = (captured[0].double() - ref).abs().max().item()
    eps = torch.finfo(dtype).eps
    assert err <= 2 * eps * v.abs().max().item()
    naive = (torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(32), dim=-1) @ v).transpose(1, 2).flatten(2)
    assert (naive.double() - ref).abs().max().item() > 20 * err  # the test tells a 16-bit softmax apart


def test_group_norm_under_bf16_autocast_is_compvis_groupnorm32():
    """CompVis GroupNorm32: normalise in fp32, return the input's dtype. Under CPU autocast our plain GroupNorm takes
    bf16 (CUDA autocast runs group_norm in fp32 itself); its kernel accumulates in fp32, so the result is
    GroupNorm32's, even for a mean far from zero (where a bf16 variance would cancel catastrophically)."""
    norm = group_norm(320, 32, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(2, 320, 8, 8) * 3 + 50).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        ours = norm(x)
    groupnorm32 = F.group_norm(x.float(), 32, norm.weight, norm.bias, 1e-5).type(x.dtype)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, groupnorm32, rtol=0, atol=0.02)  # within 1 bf16 ulp of |y| < 4


def diffusers_twin(unet: CrossAttentionUNet, sample_size: int = 8) -> UNet2DConditionModel:
    theirs = UNet2DConditionModel(**diffusers_unet_config(unet, sample_size=sample_size)).eval()
    theirs.load_state_dict(unet_to_layout(unet.state_dict(), unet, "diffusers"), strict=True)
    return theirs


def test_unet_under_16_bit_matches_diffusers():
    """Under bf16/fp16 autocast and with 16-bit weights our UNet is as far from its float64 self as diffusers'
    UNet2DConditionModel with the same weights: no step of ours runs at lower precision than theirs."""
    ours = perturbed_unet()
    theirs = diffusers_twin(ours)
    x, t, context = unet_inputs()
    context = context * 3
    with torch.no_grad():
        ref = copy.deepcopy(ours).double()(x.double(), t, context.double())

        def rel(out):
            return ((out.double() - ref).norm() / ref.norm()).item()

        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype):
                a, b = ours(x, t, context), theirs(x, t, encoder_hidden_states=context).sample
            assert a.dtype == dtype and rel(a) <= 1.01 * rel(b) + 1e-6 and rel(a) < 0.05
            o16, t16 = copy.deepcopy(ours).to(dtype), copy.deepcopy(theirs).to(dtype)
            a = o16(x.to(dtype), t, context.to(dtype))
            b = t16(x.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample
            assert rel(a) <= 1.01 * rel(b) + 1e-6 and rel(a) < 0.05


def test_context_mask_matches_diffusers_encoder_attention_mask():
    """A partly masked context (different length from the image tokens) gives diffusers' output with
    encoder_attention_mask (keep = 1): masked tokens are excluded from every cross-attention softmax."""
    ours = perturbed_unet()
    theirs = diffusers_twin(ours)
    x, t, context = unet_inputs(length=7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 1:] = False
    with torch.no_grad():
        a = ours(x, t, context, context_mask=mask)
        b = theirs(x, t, encoder_hidden_states=context, encoder_attention_mask=mask.long()).sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_from_scratch_init_is_compvis():
    """Zeroed exactly where CompVis applies zero_module (each residual block's last conv, each transformer's
    proj_out, the output conv); everything else PyTorch's default init, as CompVis and diffusers. The autoencoder
    has no zero-initialised layer."""
    torch.manual_seed(0)
    unet = CrossAttentionUNet(**TINY_UNET)
    expected = {f"{name}.conv2" for name, m in unet.named_modules() if isinstance(m, ResnetBlock)}
    expected |= {f"{name}.proj_out" for name, m in unet.named_modules() if isinstance(m, SpatialTransformer)}
    expected |= {"out.2"}
    zeroed = {
        name.rsplit(".", 1)[0]
        for name, p in unet.named_parameters()
        if name.endswith("weight") and torch.count_nonzero(p) == 0
    }
    assert zeroed == expected
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and name not in expected:
            fan_in = m.weight[0].numel()  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert m.weight.abs().max() <= 1 / math.sqrt(fan_in)
            assert m.weight.std() > 0.5 / math.sqrt(3 * fan_in)
        if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
    vae = KLAutoencoder(**TINY_VAE)
    assert all(torch.count_nonzero(p) > 0 for n, p in vae.named_parameters() if n.endswith("weight"))


def test_gradient_checkpointing_with_dropout_is_exact():
    """Non-reentrant checkpointing replays the dropout masks (RNG state saved): same outputs and gradients."""
    plain = perturbed_unet(dropout=0.3)
    ckpt = CrossAttentionUNet(**TINY_UNET, dropout=0.3, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, context = unet_inputs()
    mask = torch.tensor([[True] * 3 + [False] * 4, [True] * 7])
    results = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(5)
        out = model(x, t, context, context_mask=mask)
        out.square().mean().backward()
        results.append([out.detach()] + [p.grad for p in model.parameters()])
    assert not torch.equal(results[0][0], plain.eval()(x, t, context, context_mask=mask))  # dropout did act
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_channels_last_gives_the_same_outputs():
    unet = perturbed_unet()
    x, t, context = unet_inputs()
    vae = KLAutoencoder(**TINY_VAE).eval()
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref_unet, ref_vae = unet(x, t, context), vae(image, sample_posterior=False).reconstruction
        unet, vae = unet.to(memory_format=torch.channels_last), vae.to(memory_format=torch.channels_last)
        out = unet(x.contiguous(memory_format=torch.channels_last), t, context)
        rec = vae(image.contiguous(memory_format=torch.channels_last), sample_posterior=False).reconstruction
    torch.testing.assert_close(out, ref_unet, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec, ref_vae, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_unet_traces_in_one_graph():
    """No graph break (data-dependent Python control flow, host syncs) in a training forward with a context mask
    and activation checkpointing, nor in the autoencoder."""
    import torch._dynamo as dynamo

    unet = perturbed_unet(gradient_checkpointing=True).train()
    x, t, context = unet_inputs()
    mask = torch.tensor([[True] * 3 + [False] * 4, [False] * 7])
    explained = dynamo.explain(unet)(x, t, context, mask)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    explained = dynamo.explain(KLAutoencoder(**TINY_VAE))(torch.randn(1, 3, 16, 16))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_posterior_matches_diffusers():
    """Same parameters → diffusers' DiagonalGaussianDistribution: logvar clamped to [-30, 20], std, var, mode,
    KL, NLL, and the same sample for the same generator."""
    g = torch.Generator().manual_seed(0)
    params = torch.randn(2, 8, 4, 4, generator=g) * 3
    params[0, 4:, 0, 0] = torch.tensor([-45.0, 35.0, -30.5, 20.5])
    ours, theirs = DiagonalGaussian(params), DiagonalGaussianDistribution(params)
    for name in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert torch.equal(ours.mode(), theirs.mode())
    torch.testing.assert_close(ours.kl(), theirs.kl())
    x = torch.randn(2, 4, 4, 4, generator=g)
    torch.testing.assert_close(ours.nll(x), theirs.nll(x))
    assert torch.equal(
        ours.sample(torch.Generator().manual_seed(3)), theirs.sample(torch.Generator().manual_seed(3))
    )
