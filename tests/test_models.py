"""Behaviour of the plain nn.Modules: KLAutoencoder, DiagonalGaussian, CrossAttentionUNet."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldm.models import AutoencoderOutput, CrossAttentionUNet, DiagonalGaussian, KLAutoencoder
from ldm.models.attention import CrossAttention
from ldm.models.layers import group_norm, timestep_embedding


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


TINY_VAE = dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4)
TINY_UNET = dict(
    model_channels=64,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(1, 2),
    head_dim=32,
    transformer_depth=1,
    context_dim=128,
)


@pytest.fixture(autouse=True)
def _one_thread_for_small_models(request):
    """Tiny models are dominated by per-op overhead, where intra-op threads only add contention."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb_zero_params(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Give the zero-initialised layers random weights so every path carries signal."""
    with torch.no_grad():
        for p in module.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0.0, scale)


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize("channels", [16, 32, 48, 96, 512])
def test_group_norm_divides_small_widths(channels):
    norm = group_norm(channels)
    assert channels % norm.num_groups == 0
    assert norm.num_groups == math.gcd(32, channels)  # 32 for every SD width, a divisor below that


def test_timestep_embedding_float_and_long_agree():
    t_long = torch.tensor([0, 1, 999])
    assert torch.equal(timestep_embedding(t_long, 64), timestep_embedding(t_long.float(), 64))
    emb = timestep_embedding(torch.tensor([0.5, 10.25]), 65)
    assert emb.shape == (2, 65) and torch.isfinite(emb).all()


# ---------------------------------------------------------------- DiagonalGaussian


def make_gaussian(shape=(3, 4, 5, 6), seed=0) -> DiagonalGaussian:
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    return DiagonalGaussian(torch.randn(b, 2 * c, h, w, generator=g))


def test_gaussian_kl_matches_torch_distributions():
    post = make_gaussian()
    ref = kl_divergence(Normal(post.mean, post.std), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert post.kl().shape == (3,)
    torch.testing.assert_close(post.kl(), ref, rtol=1e-5, atol=1e-5)


def test_gaussian_nll_matches_torch_distributions():
    post = make_gaussian()
    x = torch.randn_like(post.mean)
    ref = -Normal(post.mean, post.std).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.nll(x), ref, rtol=1e-5, atol=1e-4)


def test_gaussian_mode_and_logvar_clamp():
    params = torch.randn(2, 8, 4, 4)
    params[:, 4:] = torch.where(params[:, 4:] > 0, 100.0, -100.0)
    post = DiagonalGaussian(params)
    assert torch.equal(post.mode(), post.mean)
    assert torch.equal(post.mean, params[:, :4])
    assert post.logvar.max() == 20.0 and post.logvar.min() == -30.0
    torch.testing.assert_close(post.var, post.std**2)


def test_gaussian_sample_statistics_and_reproducibility():
    mean = torch.full((4, 4, 64, 64), 1.5)
    logvar = torch.full((4, 4, 64, 64), 2 * torch.log(torch.tensor(0.3)).item())
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    z = post.sample(torch.Generator().manual_seed(0))
    assert z.shape == mean.shape
    assert abs(z.mean().item() - 1.5) < 0.01  # 65k samples: std of the estimate ≈ 0.3 / 256
    assert abs(z.std().item() - 0.3) < 0.01
    z2 = post.sample(torch.Generator().manual_seed(0))
    assert torch.equal(z, z2)


# ---------------------------------------------------------------- KLAutoencoder


@pytest.mark.parametrize(
    ("config", "factor"),
    [
        (TINY_VAE, 4),
        (dict(base_channels=16, channel_mult=(1, 2, 2, 4), num_res_blocks=1, latent_channels=4), 8),
    ],
)
@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_vae_shapes(config, factor, size):
    torch.manual_seed(0)
    vae = KLAutoencoder(**config)
    assert vae.downsample_factor == factor
    x = torch.rand(2, 3, *size) * 2 - 1
    posterior = vae.encode(x)
    assert posterior.mean.shape == (2, 4, size[0] // factor, size[1] // factor)
    out = vae(x, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, AutoencoderOutput)
    assert out.reconstruction.shape == x.shape
    assert vae.decode(posterior.mode()).shape == x.shape


def test_vae_sample_posterior_flag_and_generator():
    torch.manual_seed(0)
    vae = KLAutoencoder(**TINY_VAE).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        det = vae(x, sample_posterior=False).reconstruction
        torch.testing.assert_close(det, vae.decode(vae.encode(x).mean))
        a = vae(x, generator=torch.Generator().manual_seed(1)).reconstruction
        b = vae(x, generator=torch.Generator().manual_seed(1)).reconstruction
    assert torch.equal(a, b)
    assert not torch.allclose(a, det)


def test_vae_last_layer_gets_gradient():
    vae = KLAutoencoder(**TINY_VAE)
    assert vae.last_layer is vae.decoder.conv_out.weight
    out = vae(torch.rand(1, 3, 16, 16))
    (out.reconstruction.square().mean() + out.posterior.kl().mean()).backward()
    assert vae.last_layer.grad is not None and vae.last_layer.grad.abs().sum() > 0


def test_tiny_vae_param_count():
    assert n_params(KLAutoencoder(**TINY_VAE)) == 954_567


def test_sd_vae_param_count_and_compvis_names():
    vae = KLAutoencoder()  # SD's sizes are the defaults
    assert n_params(vae) == 83_653_863  # SD's AutoencoderKL
    keys = set(vae.state_dict())
    expected = {
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.norm1.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.block_1.conv2.bias",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.conv_in.weight",
        "decoder.mid.block_2.norm2.bias",
        "decoder.up.0.block.2.conv2.weight",
        "decoder.up.3.upsample.conv.weight",
        "decoder.up.1.block.0.nin_shortcut.weight",
        "decoder.norm_out.bias",
        "decoder.conv_out.weight",
    }
    assert expected <= keys
    assert "encoder.down.3.downsample.conv.weight" not in keys
    assert "decoder.up.0.upsample.conv.weight" not in keys
    assert vae.encoder.conv_out.out_channels == 8


# ---------------------------------------------------------------- CrossAttentionUNet


def unet_inputs(batch=2, size=(8, 8), length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, length, 128, generator=g)
    return x, t, context


@pytest.mark.parametrize("size", [(8, 8), (8, 12), (16, 6)])
def test_unet_shape_and_zero_output_at_init(size):
    torch.manual_seed(0)
    unet = CrossAttentionUNet(**TINY_UNET)
    x, t, context = unet_inputs(size=size)
    out = unet(x, t, context)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0


def test_unet_rejects_indivisible_size_and_ambiguous_heads():
    unet = CrossAttentionUNet(**TINY_UNET)
    x, t, context = unet_inputs(size=(8, 7))
    with pytest.raises(ValueError, match="divisible"):
        unet(x, t, context)
    with pytest.raises(ValueError, match="exactly one"):
        CrossAttentionUNet(**{**TINY_UNET, "num_heads": 4})
    heads_unet = CrossAttentionUNet(**{**TINY_UNET, "head_dim": None, "num_heads": 4})
    assert heads_unet.middle_block[1].transformer_blocks[0].attn2.heads == 4


@pytest.fixture(scope="module")
def perturbed_unet() -> CrossAttentionUNet:
    torch.manual_seed(0)
    unet = CrossAttentionUNet(**TINY_UNET).eval()
    perturb_zero_params(unet)
    return unet


def test_unet_uses_context(perturbed_unet):
    x, t, context = unet_inputs()
    context.requires_grad_(True)
    out = perturbed_unet(x, t, context)
    out.square().sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
    with torch.no_grad():
        other = perturbed_unet(x, t, torch.randn_like(context))
    assert not torch.allclose(out.detach(), other, atol=1e-4)


def test_unet_context_mask_hides_tokens(perturbed_unet):
    x, t, context = unet_inputs(length=7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 2:] = False
    changed = context.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10
    with torch.no_grad():
        a = perturbed_unet(x, t, context, context_mask=mask)
        b = perturbed_unet(x, t, changed, context_mask=mask)
        c = perturbed_unet(x, t, changed)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4)  # without the mask those tokens do matter
    # Dropping the masked tokens altogether gives the same answer per sample.
    with torch.no_grad():
        first = perturbed_unet(x[:1], t[:1], context[:1, :4])
    torch.testing.assert_close(a[:1], first, rtol=1e-4, atol=1e-5)


def test_fully_masked_context_is_finite():
    attn = CrossAttention(16, context_dim=8, heads=2, dim_head=8)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    mask = torch.tensor([[False, False, False], [True, False, True]])
    out = attn(x, context, mask)
    assert torch.isfinite(out).all()
    bias = attn.to_out[0].bias
    torch.testing.assert_close(out[0], bias.expand(5, 16).detach())  # no context → zero attention output


def test_unet_float_and_long_timesteps_agree(perturbed_unet):
    x, t, context = unet_inputs()
    with torch.no_grad():
        a = perturbed_unet(x, t, context)
        b = perturbed_unet(x, t.float(), context)
        c = perturbed_unet(x, t.float() + 0.5, context)
        scalar = perturbed_unet(x, torch.tensor(17.0), context)
        vector = perturbed_unet(x, torch.full((2,), 17), context)
    assert torch.equal(a, b)
    assert torch.isfinite(c).all() and not torch.allclose(a, c)
    torch.testing.assert_close(scalar, vector)


def test_unet_gradient_checkpointing_same_gradients(monkeypatch):
    import ldm.models.unet as unet_module

    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(type(fn).__name__)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting_checkpoint)
    torch.manual_seed(0)
    plain = CrossAttentionUNet(**TINY_UNET)
    perturb_zero_params(plain)
    ckpt = CrossAttentionUNet(**TINY_UNET, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, context = unet_inputs()
    grads = []
    for model in (plain, ckpt):
        model.train()
        ctx = context.clone().requires_grad_(True)
        model(x, t, ctx).square().mean().backward()
        grads.append([ctx.grad] + [p.grad for p in model.parameters()])
    for g_plain, g_ckpt in zip(*grads, strict=True):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-4, atol=1e-6)
    # (res block + transformer): 2 input levels x 1, middle 3 modules, 2 output levels x 2 -> 4 + 3 + 8
    assert sorted(set(calls)) == ["ResnetBlock", "SpatialTransformer"] and len(calls) == 15
    calls.clear()
    with torch.no_grad():
        ckpt.eval()(x, t, context)
    assert not calls  # only while training


def test_unet_pooled_embedding():
    torch.manual_seed(0)
    unet = CrossAttentionUNet(**TINY_UNET, pooled_dim=32).eval()
    perturb_zero_params(unet)
    x, t, context = unet_inputs()
    with torch.no_grad():
        a = unet(x, t, context, pooled=torch.zeros(2, 32))
        b = unet(x, t, context, pooled=torch.randn(2, 32))
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="pooled"):
        unet(x, t, context)


def test_constructors_accept_lists():
    """Hydra passes lists (ListConfig) where tuples are natural."""
    vae = KLAutoencoder(base_channels=16, channel_mult=[1, 2], num_res_blocks=1)
    assert vae.downsample_factor == 2
    unet = CrossAttentionUNet(**{**TINY_UNET, "channel_mult": [1, 2], "attention_resolutions": [1, 2]})
    assert n_params(unet) == n_params(CrossAttentionUNet(**TINY_UNET))


def test_unet_dropout_acts_in_the_residual_blocks_only():
    """As SD's UNetModel and diffusers' UNet2DConditionModel: the transformer blocks get no dropout."""
    from ldm.models.attention import SpatialTransformer
    from ldm.models.layers import ResnetBlock

    unet = CrossAttentionUNet(**{**TINY_UNET, "dropout": 0.25})

    def rates(kind: type) -> set[float]:
        return {
            d.p
            for block in unet.modules()
            if isinstance(block, kind)
            for d in block.modules()
            if isinstance(d, torch.nn.Dropout)
        }

    assert rates(ResnetBlock) == {0.25}
    assert rates(SpatialTransformer) == {0.0}


@pytest.mark.parametrize(("num_res_blocks", "expected"), [(1, 4_283_012), (2, 6_272_708)])
def test_tiny_unet_param_count(num_res_blocks, expected):
    assert n_params(CrossAttentionUNet(**{**TINY_UNET, "num_res_blocks": num_res_blocks})) == expected


# The SD2-base UNet (865,910,724 parameters) is built and stepped, composed from `experiment=laion_256`, in
# tests/test_configs.py::test_laion_256_builds_and_steps.


# ---------------------------------------------------------------- QK-norm


def test_qk_norm_attention_is_the_normalised_formula_and_ignores_the_projection_scale():
    torch.manual_seed(0)
    attn = CrossAttention(32, 24, heads=4, dim_head=8, qk_norm=True)
    with torch.no_grad():  # gains away from their initial ones, so the test sees them applied
        attn.norm_q.weight.uniform_(0.5, 2.0)
        attn.norm_k.weight.uniform_(0.5, 2.0)
    x, context = torch.randn(2, 10, 32), torch.randn(2, 5, 24)
    out = attn(x, context)

    def heads(t):  # (B, N, H*D) → (B, H, N, D)
        return t.view(t.shape[0], t.shape[1], 4, 8).transpose(1, 2)

    def rms(t, gain):
        return t / t.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * gain

    q = rms(heads(x @ attn.to_q.weight.T), attn.norm_q.weight)
    k = rms(heads(context @ attn.to_k.weight.T), attn.norm_k.weight)
    v = heads(context @ attn.to_v.weight.T)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = attn.to_out((weights @ v).transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

    # the logits no longer grow with the query/key projections: ×50 leaves the output as it was
    with torch.no_grad():
        attn.to_q.weight.mul_(50)
        attn.to_k.weight.mul_(50)
    torch.testing.assert_close(attn(x, context), out, rtol=1e-4, atol=1e-5)
    plain = CrossAttention(32, 24, heads=4, dim_head=8)
    before = plain(x, context)
    with torch.no_grad():
        plain.to_q.weight.mul_(50)
    assert not torch.allclose(plain(x, context), before, atol=1e-3)  # without it they do


def test_qk_norm_unet_trains_and_has_its_gains():
    torch.manual_seed(0)
    unet = CrossAttentionUNet(**{**TINY_UNET, "qk_norm": True})
    names = [n for n, _ in unet.named_parameters() if ".norm_q." in n or ".norm_k." in n]
    transformers = sum(1 for n, _ in unet.named_modules() if n.endswith("attn1") or n.endswith("attn2"))
    assert len(names) == 2 * transformers > 0  # a query and a key gain in every attention layer
    extra = n_params(unet) - n_params(CrossAttentionUNet(**TINY_UNET))
    assert extra == sum(p.numel() for n, p in unet.named_parameters() if n in names)
    for p in unet.parameters():  # leave the zero-initialised output layers, so every gain gets a gradient
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    x, t, context = unet_inputs()
    unet(x, t, context).square().mean().backward()
    grads = dict(unet.named_parameters())
    assert all(grads[n].grad is not None and grads[n].grad.abs().sum() > 0 for n in names)
