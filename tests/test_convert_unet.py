"""UNet and autoencoder weights in CompVis and diffusers layouts, checked against diffusers' own classes and
converters (an independent implementation of both networks): same weights → the same outputs."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)

from ldm.models import CrossAttentionUNet, KLAutoencoder
from ldm.models.convert_unet import (
    COMPVIS_UNET_PREFIX,
    check_exportable,
    compvis_unet_params,
    diffusers_unet_config,
    unet_from_layout,
    unet_key_map,
    unet_to_layout,
)
from ldm.models.convert_vae import diffusers_to_ldm, diffusers_vae_config, ldm_to_diffusers

# SD2-like (head_dim, attention everywhere, pooled projection) and SD1-like (fixed head count, no attention at full
# resolution, two transformer layers, two residual blocks per level, three levels)
ARCHS = {
    "head_dim_pooled": dict(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        head_dim=16,
        context_dim=24,
        pooled_dim=12,
    ),
    "num_heads_deep": dict(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(2, 4),
        head_dim=None,
        num_heads=2,
        context_dim=24,
        transformer_depth=2,
    ),
}


def random_unet(**kwargs) -> CrossAttentionUNet:
    """A UNet whose every weight is random: the zero-initialised output layers would hide a wrong mapping."""
    torch.manual_seed(0)
    unet = CrossAttentionUNet(in_channels=4, out_channels=4, **kwargs).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.05)
    return unet


def inputs(context_dim: int = 24):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([7, 815])
    context = torch.randn(2, 5, context_dim, generator=g)
    return x, t, context, torch.randn(2, 12, generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_diffusers_layout_gives_the_same_network(arch):
    ours = random_unet(**ARCHS[arch])
    theirs = UNet2DConditionModel(**diffusers_unet_config(ours, sample_size=8)).eval()
    state = unet_to_layout(ours.state_dict(), ours, "diffusers")
    theirs.load_state_dict(state, strict=True)  # every tensor placed, none left over
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    x, t, context, pooled = inputs()
    pooled = pooled if ours.pooled_proj is not None else None
    with torch.no_grad():
        expected = ours(x, t, context, pooled=pooled)
        got = theirs(x, t, encoder_hidden_states=context, class_labels=pooled).sample
    assert expected.abs().mean() > 1e-2  # a real output, not the zero of an untrained output layer
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    back = unet_from_layout(state, ours, "diffusers")
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_compvis_layout_read_by_diffusers_converter():
    """Our CompVis names and SD inference params, converted by diffusers' single-file code (which knows SD's real
    layout), load into its UNet and compute our function."""
    arch = {**ARCHS["num_heads_deep"], "num_heads": None, "head_dim": 16}
    ours = random_unet(**arch)
    checkpoint = {
        COMPVIS_UNET_PREFIX + k: v for k, v in unet_to_layout(ours.state_dict(), ours, "compvis").items()
    }
    assert "model.diffusion_model.input_blocks.1.0.in_layers.0.weight" in checkpoint  # openaimodel's names
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in checkpoint  # a downsampler
    original_config = {
        "model": {
            "params": {
                "unet_config": {"params": compvis_unet_params(ours, image_size=8)},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    with pytest.warns(FutureWarning):  # diffusers deprecates passing the size; without it, it guesses SD's
        config = create_unet_diffusers_config_from_ldm(original_config, checkpoint, image_size=64)
    theirs = UNet2DConditionModel(**config).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    x, t, context, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(x, t, encoder_hidden_states=context).sample, ours(x, t, context), rtol=1e-5, atol=1e-6
        )
    back = unet_from_layout(checkpoint, ours, "compvis")  # the prefix is optional on the way back
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_layouts_refuse_what_they_cannot_hold():
    with pytest.raises(ValueError, match="micro_conditioning"):
        check_exportable(
            CrossAttentionUNet(
                model_channels=32, channel_mult=(1, 2), head_dim=16, context_dim=8, micro_conditioning=True
            ),
            "diffusers",
        )
    pooled = CrossAttentionUNet(
        model_channels=32, channel_mult=(1, 2), head_dim=16, context_dim=8, pooled_dim=4
    )
    assert check_exportable(pooled, "diffusers") == 32
    with pytest.raises(ValueError, match="pooled text embedding.*diffusers layout instead"):
        check_exportable(pooled, "compvis")
    # 48 channels with 32 groups fall back to gcd = 16 groups, 96 channels keep 32: no single count
    narrow = CrossAttentionUNet(model_channels=48, channel_mult=(1, 2), head_dim=24, context_dim=8)
    with pytest.raises(ValueError, match=r"\[16, 32\] groups.*48 channels → 16 groups"):
        unet_key_map(narrow, "diffusers")
    sixteen = CrossAttentionUNet(
        model_channels=48, channel_mult=(1, 2), head_dim=24, context_dim=8, num_groups=16
    )
    assert diffusers_unet_config(sixteen, 8)["norm_num_groups"] == 16
    with pytest.raises(ValueError, match="always use 32"):
        compvis_unet_params(sixteen, 8)
    with pytest.raises(ValueError, match="unknown UNet layout"):
        check_exportable(sixteen, "onnx")
    state = unet_to_layout(sixteen.state_dict(), sixteen, "diffusers")
    state.pop("conv_in.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing \(conv_in.weight\), 1 unknown \(extra.weight\)"):
        unet_from_layout(state, sixteen, "diffusers")


@pytest.mark.parametrize("mid_attention", [True, False])
def test_autoencoder_diffusers_layout_gives_the_same_network(mid_attention):
    config = dict(
        in_channels=3,
        out_channels=3,
        base_channels=16,
        channel_mult=[1, 2, 4],
        num_res_blocks=1,
        latent_channels=4,
        mid_attention=mid_attention,
        dropout=0.0,
        num_groups=8,
    )
    torch.manual_seed(0)
    ours = KLAutoencoder(**config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    theirs = AutoencoderKL(**diffusers_vae_config(config, 0.7, 0.0, sample_size=32)).eval()
    state = ldm_to_diffusers(ours.state_dict())
    theirs.load_state_dict(state, strict=True)
    assert theirs.config.scaling_factor == 0.7 and theirs.config.shift_factor is None
    back = diffusers_to_ldm(state)  # the import direction, written earlier for SD VAEs, undoes it exactly
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x).mean
        torch.testing.assert_close(theirs.encode(x).latent_dist.mean, z, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(theirs.decode(z).sample, ours.decode(z), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="1 keys are not KLAutoencoder entries: encoder.extra.weight"):
        ldm_to_diffusers({**ours.state_dict(), "encoder.extra.weight": torch.zeros(1)})
