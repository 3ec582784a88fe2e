"""Pretrained SD autoencoder import: CompVis and diffusers key layouts → KLAutoencoder, checked against diffusers."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import save_file

from ldm.models import KLAutoencoder
from ldm.models.convert_vae import (
    check_state_dict,
    compvis_to_ldm,
    detect_layout,
    diffusers_to_ldm,
    infer_autoencoder_config,
    load_pretrained_vae,
)
from ldm.utils.checkpoint import load_bundle, submodule_state

from .helpers import ROOT, compose_train

# SD's layout at a tiny size: 32 groups, widths >= 32, two downsamplings (f = 4)
SMALL = dict(base_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, latent_channels=4)


def _perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random offsets on every parameter, so GroupNorm affines (init 1/0) differ and a swapped key would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def _diffusers_vae(**kwargs):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        **kwargs,
    )
    return _perturb(vae)


def _cli_main(argv: list[str]) -> dict:
    spec = importlib.util.spec_from_file_location("import_sd_vae", ROOT / "scripts" / "import_sd_vae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _image(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def _assert_matches_diffusers(ours: KLAutoencoder, vae) -> None:
    x = _image()
    reference = vae.encode(x).latent_dist
    posterior = ours.encode(x)
    torch.testing.assert_close(posterior.mean, reference.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(posterior.logvar, reference.logvar, atol=1e-5, rtol=1e-5)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours.decode(z), vae.decode(z).sample, atol=1e-5, rtol=1e-5)


def _ours(config: dict, state_dict: dict) -> KLAutoencoder:
    model = KLAutoencoder(**config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def test_diffusers_weights_reproduce_diffusers_outputs():
    vae = _diffusers_vae()
    state = vae.state_dict()
    assert detect_layout(state) == "diffusers"
    converted = diffusers_to_ldm(state)
    config = infer_autoencoder_config(converted)
    assert config == {
        **SMALL,
        "in_channels": 3,
        "out_channels": 3,
        "mid_attention": True,
        "dropout": 0.0,
        "num_groups": 32,
    }
    assert converted["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # Linear (C, C) → 1x1 conv
    # decoder up_blocks run from the lowest resolution: up_blocks.0 is our up.2, and it upsamples
    torch.testing.assert_close(
        converted["decoder.up.2.upsample.conv.weight"], state["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    )
    _assert_matches_diffusers(_ours(config, converted), vae)


def test_older_diffusers_attention_names_and_missing_quant_convs():
    """query/key/value/proj_attn (diffusers < 0.14) and use_quant_conv=False (SD3/Flux-style) sources."""
    vae = _diffusers_vae(use_quant_conv=False, use_post_quant_conv=False)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in vae.state_dict().items():
        for new, legacy in old.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        state[key] = value
    assert any(".query." in k for k in state) and not any(k.startswith("quant_conv") for k in state)
    converted = diffusers_to_ldm(state)
    torch.testing.assert_close(converted["quant_conv.weight"][:, :, 0, 0], torch.eye(8))
    _assert_matches_diffusers(_ours(infer_autoencoder_config(converted), converted), vae)


@pytest.mark.parametrize("linear_attention", [False, True])
def test_compvis_full_checkpoint_round_trips(linear_attention):
    model = _perturb(KLAutoencoder(**SMALL), seed=3)
    own = model.state_dict()
    assert detect_layout(own) == "ldm"  # our names are CompVis's
    full = {f"first_stage_model.{k}": v for k, v in own.items()}
    if linear_attention:  # as written by diffusers → original-SD converters
        for k in list(full):
            if ".mid.attn_1." in k and k.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                full[k] = full[k][:, :, 0, 0]
    full.update(
        {
            "first_stage_model.loss.logvar": torch.zeros(()),
            "first_stage_model.loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
            "first_stage_model.loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3),
            "model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 4, 3, 3),
            "cond_stage_model.model.positional_embedding": torch.randn(77, 64),
        }
    )
    assert detect_layout(full) == "compvis"
    converted = compvis_to_ldm(full)
    assert converted.keys() == own.keys()
    for k, v in own.items():
        assert torch.equal(converted[k], v), k
    config = infer_autoencoder_config(converted)
    assert {k: config[k] for k in SMALL} == SMALL
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(
            _ours(config, converted)(x, sample_posterior=False).reconstruction,
            model(x, sample_posterior=False).reconstruction,
        )


def test_cli_writes_a_stage1_checkpoint_that_reproduces_diffusers(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    vae = _diffusers_vae()
    folder = tmp_path / "vae"
    folder.mkdir()
    src = folder / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, src)
    (folder / "config.json").write_text(
        json.dumps({"_class_name": "AutoencoderKL", "norm_num_groups": 32, "scaling_factor": 0.5})
    )
    out = tmp_path / "stage1" / "vae.ckpt"
    _cli_main([str(src), str(out), "--latent-scale", "0.5", "--resolution", "32"])

    bundle, ckpt = load_bundle(out)
    assert bundle["stage"] == "autoencoder" and bundle["format_version"] == 1
    assert bundle["latent_scale"] == 0.5 and bundle["latent_shift"] == 0.0
    assert bundle["downsample_factor"] == 4
    assert bundle["source"]["layout"] == "diffusers"
    assert bundle["config"]["data"] == {"resolution": 32}
    assert bundle["config"]["autoencoder"]["_target_"] == "ldm.models.KLAutoencoder"
    # as stage 2 builds it (ldm.training.run): instantiate the bundle's config, load `autoencoder.*` strictly
    ours = instantiate(OmegaConf.create(bundle["config"]["autoencoder"]))
    ours.load_state_dict(submodule_state(ckpt["state_dict"], "autoencoder"))
    _assert_matches_diffusers(ours.eval(), vae)


def test_cli_without_a_scale_leaves_it_to_stage2_and_reads_bin_files(tmp_path, capsys):
    vae = _diffusers_vae()
    src = tmp_path / "diffusion_pytorch_model.bin"
    torch.save({"state_dict": vae.state_dict()}, src)
    _cli_main([str(src), str(tmp_path / "vae.ckpt")])
    bundle, _ = load_bundle(tmp_path / "vae.ckpt")
    assert bundle["latent_scale"] is None
    assert "stage 2 measures it" in capsys.readouterr().out


def test_cli_measures_the_scale_on_shards(tmp_path, synthetic_shards):
    model = _perturb(KLAutoencoder(**SMALL), seed=4)
    src = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in model.state_dict().items()}}, src)
    _cli_main(
        [
            str(src),
            str(tmp_path / "vae.ckpt"),
            "--measure-on",
            synthetic_shards[0],
            "--resolution",
            "32",
            "--num-images",
            "12",
        ]
    )
    bundle, _ = load_bundle(tmp_path / "vae.ckpt")
    assert bundle["source"]["layout"] == "compvis" and bundle["latent_stats"]["num_samples"] == 12
    scale = bundle["latent_scale"]
    assert scale is not None and 0 < scale < float("inf")


def test_not_a_vae_fails_clearly(tmp_path):
    unet_like = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3)}
    with pytest.raises(ValueError, match="not a KL autoencoder.*input_blocks"):
        detect_layout(unet_like)
    path = tmp_path / "unet.safetensors"
    save_file(unet_like, path)
    with pytest.raises(ValueError, match="not a KL autoencoder"):
        load_pretrained_vae(path)


def test_missing_and_unknown_keys_are_listed():
    state = KLAutoencoder(**SMALL).state_dict()
    config = infer_autoencoder_config(state)
    check_state_dict(state, config)
    broken = {k: v for k, v in state.items() if k != "decoder.up.1.block.0.conv2.bias"}
    broken["decoder.up.1.block.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing 1: decoder\.up\.1\.block\.0\.conv2\.bias.*unexpected 1"):
        check_state_dict(broken, config)
    diffusers_like = {
        "encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1),
        "encoder.down_blocks.0.foo.weight": torch.zeros(1),
    }
    with pytest.raises(ValueError, match="no KLAutoencoder counterpart: encoder.down_blocks.0.foo.weight"):
        diffusers_to_ldm(diffusers_like)


def test_stage2_builds_on_the_imported_autoencoder(tmp_path):
    """What `train.py experiment=tiny autoencoder_ckpt=...` does before training: adopt the architecture, load
    the weights strictly, take the recorded latent scale."""
    from ldm.training.run import _adopt_autoencoder_config, build_module

    model = _perturb(KLAutoencoder(**SMALL), seed=5)
    src = tmp_path / "vae.safetensors"
    save_file(model.state_dict(), src)
    out = tmp_path / "vae.ckpt"
    _cli_main([str(src), str(out), "--latent-scale", "0.25"])
    cfg = compose_train("experiment=tiny", f"autoencoder_ckpt={out}", run_dir=str(tmp_path / "run"))
    _adopt_autoencoder_config(cfg)
    module = build_module(cfg)
    assert float(module.codec.scale) == 0.25 and module.codec.is_calibrated
    for k, v in model.state_dict().items():
        assert torch.equal(module.codec.autoencoder.state_dict()[k], v), k
