"""Stage-1 loss parts: weight lookup, LPIPS (against torchmetrics' reference), PatchGAN, AutoencoderLoss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldm.models import KLAutoencoder
from ldm.models.discriminator import PatchDiscriminator
from ldm.models.lpips import LPIPS, VGG16_FILE, VGG16_URL, WEIGHTS_CONFIG_KEY, lpips_heads_path
from ldm.training import autoencoder_loss
from ldm.training.autoencoder_loss import (
    AutoencoderLoss,
    adaptive_weight,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldm.utils.weights import MissingWeightsError, find_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def hub_dir(monkeypatch, tmp_path):
    """An empty torch hub directory, so no cached file on this machine is found."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hub


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- weight files


def test_find_weights_explicit_then_cache(hub_dir, tmp_path):
    args = ("w.pth", "https://example.org/w.pth", "test", "stage.loss.w")
    local = tmp_path / "local.pth"
    local.write_bytes(b"x")
    assert find_weights(str(local), *args) == local
    cached = hub_dir / "checkpoints" / "w.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_weights(None, *args) == cached
    with pytest.raises(MissingWeightsError, match="stage.loss.w=.*does not exist"):
        find_weights(str(tmp_path / "typo.pth"), *args)


def test_missing_vgg_weights_name_file_url_directory_and_key(hub_dir):
    with pytest.raises(MissingWeightsError) as err:
        LPIPS(pretrained=True)
    message = str(err.value)
    assert VGG16_FILE in message and VGG16_URL in message and WEIGHTS_CONFIG_KEY in message
    assert str(hub_dir / "checkpoints") in message


# ---------------------------------------------------------------- LPIPS


def test_lpips_loads_local_vgg_file_and_matches_torchmetrics(tmp_path):
    """torchmetrics' reference with a random torchvision vgg16 backbone and the bundled heads; ours loads the same
    backbone from a torchvision-format file and the heads from torchmetrics: same distances."""
    from torchmetrics.functional.image.lpips import _LPIPS

    torch.manual_seed(0)
    reference = _LPIPS(pretrained=True, net="vgg", pnet_rand=True)
    state = {
        f"features.{name}": p
        for i in range(1, 6)
        for name, p in getattr(reference.net, f"slice{i}").named_parameters()
    }
    state["classifier.0.weight"] = torch.zeros(4, 4)  # the rest of a vgg16 state dict is ignored
    path = tmp_path / VGG16_FILE
    torch.save(state, path)

    ours = LPIPS(pretrained=True, vgg_weights=str(path))
    ours_state = {f"features.{k.split('.', 1)[1]}": v for k, v in ours.slices.state_dict().items()}
    assert ours_state.keys() == {k for k in state if k.startswith("features.")}
    assert all(torch.equal(ours_state[k], state[k]) for k in ours_state)
    heads = torch.load(lpips_heads_path(), map_location="cpu", weights_only=True)
    assert torch.equal(ours.heads[3].weight, heads["lin3.model.1.weight"])

    x, y = images(seed=1), images(seed=2)
    with torch.no_grad():
        expected = reference(x, y).flatten()
        got = ours(x, y)
    assert got.shape == (2,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_random_lpips_is_a_frozen_distance():
    lpips = LPIPS(pretrained=False)
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training
    x = images(seed=1)
    y = images(seed=2).requires_grad_(True)
    d = lpips(x, y)
    assert (d > 1e-3).all()
    assert lpips(x, x).abs().max() < 1e-6
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


# ---------------------------------------------------------------- PatchGAN


def patchgan_params(in_channels: int, ndf: int, n_layers: int, norm: str) -> int:
    """Count from the architecture: 4x4 convs, a bias only where no norm follows, two affine parameters per norm."""
    widths = [ndf * min(2**n, 8) for n in range(n_layers + 1)]
    count = 16 * in_channels * ndf + ndf
    for c_in, c_out in zip(widths, widths[1:]):
        count += 16 * c_in * c_out + (c_out if norm == "none" else 2 * c_out)
    return count + 16 * widths[-1] + 1


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_patch_discriminator_parameter_count(norm):
    assert n_params(PatchDiscriminator(norm=norm)) == patchgan_params(3, 64, 3, norm)


def test_patch_discriminator_sd_config_is_taming_s():
    # taming's NLayerDiscriminator: BatchNorm, convs before a norm without bias
    assert n_params(PatchDiscriminator()) == 2_765_633
    assert n_params(PatchDiscriminator(norm="none")) == 2_764_737


@pytest.mark.parametrize(("size", "out"), [(32, 2), (256, 30)])
def test_patch_discriminator_logit_map(size, out):
    assert PatchDiscriminator(ndf=8)(images(batch=2, size=size)).shape == (2, 1, out, out)


def test_patch_discriminator_init_is_taming_s():
    disc = PatchDiscriminator()
    conv, norm = disc.main[5], disc.main[6]
    assert abs(conv.weight.std().item() - 0.02) < 1e-3 and abs(conv.weight.mean().item()) < 1e-3
    assert abs(norm.weight.mean().item() - 1.0) < 0.01 and torch.count_nonzero(norm.bias) == 0


# ---------------------------------------------------------------- loss functions

REAL = torch.tensor([2.0, 0.5, -1.0, 0.0]).view(1, 1, 2, 2)
FAKE = torch.tensor([-2.0, 0.5, 1.0, -0.5]).view(1, 1, 2, 2)


def test_hinge_golden():
    # relu(1 - real) = [0, .5, 2, 1], relu(1 + fake) = [0, 1.5, 2, .5]
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(0.5 * (3.5 / 4 + 4.0 / 4))


def test_vanilla_golden():
    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    expected = 0.5 * (
        sum(softplus(-r) for r in REAL.flatten().tolist()) / 4
        + sum(softplus(f) for f in FAKE.flatten().tolist()) / 4
    )
    assert vanilla_d_loss(REAL, FAKE).item() == pytest.approx(expected, rel=1e-6)


def test_adaptive_weight_is_the_gradient_norm_ratio():
    """x̂ = z Wᵀ, nll = Σ|x̂ − x| / B, g = −mean(x̂ v): ∇_W nll = sign(x̂ − x)ᵀ z / B, ∇_W g = −v (Σ_b z_b)ᵀ / B."""
    gen = torch.Generator().manual_seed(0)
    b, k, n = 3, 4, 6
    z, x, v = (
        torch.randn(b, k, generator=gen),
        torch.randn(b, n, generator=gen),
        torch.randn(n, generator=gen),
    )
    weight = torch.randn(n, k, generator=gen, requires_grad=True)
    recon = z @ weight.T
    nll, g = (recon - x).abs().sum() / b, -(recon @ v).mean()
    grad_nll = torch.sign(recon - x).detach().T @ z / b
    grad_g = -torch.outer(v, z.sum(0)) / b
    expected = grad_nll.norm() / (grad_g.norm() + 1e-4)

    lam = adaptive_weight(nll, g, weight)
    torch.testing.assert_close(lam, expected)
    assert not lam.requires_grad
    assert adaptive_weight(nll, 1e-9 * g, weight, max_weight=7.0) == 7.0
    (nll + lam * g).backward()  # graph retained for the caller's backward
    torch.testing.assert_close(weight.grad, grad_nll + lam * grad_g)


# ---------------------------------------------------------------- AutoencoderLoss


def tiny_autoencoder() -> KLAutoencoder:
    torch.manual_seed(0)
    return KLAutoencoder(
        base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, mid_attention=False
    )


def make_loss(**kwargs) -> AutoencoderLoss:
    torch.manual_seed(1)
    defaults = dict(discriminator=PatchDiscriminator(ndf=8), lpips=LPIPS(pretrained=False), disc_start=10)
    return AutoencoderLoss(**{**defaults, **kwargs})


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def compvis_loss(loss_fn: AutoencoderLoss, x, out, last_layer) -> tuple[torch.Tensor, torch.Tensor]:
    """CompVis `LPIPSWithDiscriminator` generator branch (logvar = 0), written out: (loss, d_weight)."""
    xr, b = out.reconstruction, x.shape[0]
    rec = (x - xr).abs() + loss_fn.perceptual_weight * loss_fn.lpips(x, xr).view(b, 1, 1, 1)
    nll = torch.sum(rec / torch.exp(torch.zeros(()))) / b
    kl = out.posterior.kl().sum() / b
    g = -loss_fn.discriminator(xr).mean()
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
    d_weight = torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0.0, 1e4).detach() * loss_fn.disc_weight
    return nll + loss_fn.kl_weight * kl + d_weight * loss_fn.disc_factor * g, d_weight


def test_generator_loss_is_compvis_divided_by_pixel_values():
    """Same d_weight as CompVis (λ is computed before the rescaling), loss and gradients exactly CompVis' / (C·H·W)."""
    ae, loss_fn, x = tiny_autoencoder(), make_loss(disc_factor=0.7), images()
    out = ae(x, generator=torch.Generator().manual_seed(0))
    ours = loss_fn.generator_loss(
        x, out.reconstruction, out.posterior, global_step=10, last_layer=ae.last_layer
    )
    reference, d_weight = compvis_loss(loss_fn, x, out, ae.last_layer)
    pixels = x[0].numel()
    torch.testing.assert_close(ours.d_weight, d_weight)
    assert ours.d_weight > 0 and ours.g_loss != 0
    torch.testing.assert_close(ours.loss * pixels, reference)
    params = [p for p in ae.parameters() if p.requires_grad]
    ours_grads = torch.autograd.grad(ours.loss, params, retain_graph=True)
    ref_grads = torch.autograd.grad(reference / pixels, params)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b)
    parts = ours.nll + (loss_fn.kl_weight * ours.kl + ours.d_weight * 0.7 * ours.g_loss) / pixels
    torch.testing.assert_close(ours.loss.detach(), parts)
    torch.testing.assert_close(ours.nll, ours.rec + ours.perceptual)


def test_before_disc_start_no_gan_and_discriminator_untouched(monkeypatch):
    ae, loss_fn, x = tiny_autoencoder(), make_loss(), images()
    calls = count_calls(loss_fn.discriminator)
    monkeypatch.setattr(autoencoder_loss, "adaptive_weight", lambda *a, **k: pytest.fail("λ computed"))
    out = ae(x)
    g = loss_fn.generator_loss(x, out.reconstruction, out.posterior, global_step=9, last_layer=ae.last_layer)
    assert g.g_loss == 0 and g.d_weight == 0
    torch.testing.assert_close(g.loss.detach(), g.nll + loss_fn.kl_weight * g.kl / x[0].numel())
    d = loss_fn.discriminator_loss(x, out.reconstruction, global_step=9)
    assert d.loss == 0 and not d.loss.requires_grad
    g.loss.backward()
    assert calls[0] == 0
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())
    assert ae.last_layer.grad is not None


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_after_disc_start_discriminator_trains(kind):
    ae, loss_fn, x = tiny_autoencoder(), make_loss(disc_loss=kind, disc_factor=0.5), images()
    out = ae(x)
    d = loss_fn.discriminator_loss(x, out.reconstruction, global_step=10)
    with torch.no_grad():
        real, fake = loss_fn.discriminator(x), loss_fn.discriminator(out.reconstruction)
    expected = 0.5 * (hinge_d_loss if kind == "hinge" else vanilla_d_loss)(real, fake)
    torch.testing.assert_close(d.loss.detach(), expected)
    torch.testing.assert_close(d.logits_real, real.mean())
    d.loss.backward()
    grads = [p.grad for p in loss_fn.discriminator.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in ae.parameters())  # inputs were detached

    g = loss_fn.generator_loss(x, out.reconstruction, out.posterior, global_step=10, last_layer=ae.last_layer)
    with torch.no_grad():
        torch.testing.assert_close(g.g_loss, -loss_fn.discriminator(out.reconstruction).mean())
    g.loss.backward()
    assert ae.last_layer.grad is not None


def test_perceptual_term_and_its_skips():
    ae, x = tiny_autoencoder(), images()
    loss_fn = make_loss(discriminator=None)
    out = ae(x)
    g = loss_fn.generator_loss(x, out.reconstruction, out.posterior, global_step=10**6)
    assert g.perceptual > 0 and g.g_loss == 0
    same = loss_fn.generator_loss(x, x.clone(), out.posterior, global_step=0)
    assert same.rec == 0 and same.perceptual.abs() < 1e-6

    for skipped in (make_loss(perceptual_weight=0.0), make_loss(lpips=None)):
        calls = count_calls(skipped.lpips) if skipped.lpips is not None else [0]
        g = skipped.generator_loss(x, out.reconstruction, out.posterior, global_step=0)
        assert g.perceptual == 0 and calls[0] == 0
        torch.testing.assert_close(g.nll, g.rec)


def test_validation_without_autograd_has_zero_d_weight():
    ae, loss_fn, x = tiny_autoencoder(), make_loss(), images()
    with torch.no_grad():
        out = ae(x)
        g = loss_fn.generator_loss(x, out.reconstruction, out.posterior, global_step=10, last_layer=None)
    assert g.d_weight == 0 and g.g_loss != 0


def test_l2_reconstruction_and_bad_arguments():
    x, y = images(seed=1), images(seed=2)
    post = tiny_autoencoder().encode(x)
    loss_fn = make_loss(reconstruction="l2", lpips=None)
    torch.testing.assert_close(loss_fn.generator_loss(x, y, post, 0).rec, F.mse_loss(y, x))
    with pytest.raises(ValueError, match="reconstruction"):
        make_loss(reconstruction="l3")
    with pytest.raises(ValueError, match="disc_loss"):
        make_loss(disc_loss="wgan")
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="instance")
