"""Every config group option and every experiment composes, passes the key check and instantiates."""

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from ldm.conditioning import MissingWeightsError
from ldm.utils.hydra_build import build_autoencoder, build_denoising_parts, check_config

from .helpers import CONFIGS, compose_train

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
GROUP_OPTIONS = sorted(
    (group.name, option.stem)
    for group in CONFIGS.iterdir()
    if group.is_dir() and group.name not in ("experiment", "hydra")
    for option in group.glob("*.yaml")
)
# instantiating these is the job of the slow laion_256 test below (or needs downloadable weights)
HEAVY = {("unet", "sd2_base"), ("text_encoder", "openclip_vit_h14")}


def test_the_four_required_experiments_exist():
    assert {"vae_tiny", "tiny", "vae_laion_256", "laion_256"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_checks(experiment):
    cfg = compose_train(f"experiment={experiment}")
    check_config(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    text = (CONFIGS / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_"), "experiments are overrides of the defaults"


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_group_option_instantiates(group, option, tmp_path):
    # the ImageNet VGG of LPIPS cannot be downloaded here: random init (its loading is tested in test_autoencoder_loss)
    offline = ["stage.loss.lpips.pretrained=false"] if (group, option) == ("stage", "autoencoder") else []
    cfg = compose_train(f"{group}={option}", *offline, run_dir=str(tmp_path))
    check_config(cfg)
    if (group, option) in HEAVY:
        pytest.skip("built in test_laion_256_builds_and_steps")
    node = cfg[group]
    if group == "unet":
        obj = instantiate(node, context_dim=32, in_channels=4, out_channels=4)
    elif group == "callbacks":
        obj = [instantiate(c) for c in node.values()]
    else:
        obj = instantiate(node)
    assert obj is not None


def test_unknown_key_fails_with_a_suggestion():
    cfg = compose_train("experiment=tiny")
    with open_dict(cfg):
        cfg.unet.atention_resolutions = [1]
    with pytest.raises(ValueError, match="did you mean 'attention_resolutions'"):
        check_config(cfg)


def test_unknown_key_on_the_command_line_fails_at_compose():
    with pytest.raises(Exception, match="foo"):
        compose_train("experiment=tiny", "unet.foo=1")


def test_pretrained_vit_h_without_weights_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_train("experiment=laion_256")
    with pytest.raises(InstantiationException, match="CLIP-ViT-H-14-laion2B-s32B-b79K") as err:
        instantiate(cfg.text_encoder)
    assert isinstance(err.value.__cause__, MissingWeightsError)


@pytest.mark.slow
def test_laion_256_builds_and_steps():
    """SD2-base-class recipe, random init on CPU: parameter counts and one training step at batch 1
    (64 px: an 8×8 latent, 1×1 at the UNet's deepest level; larger images cost more and show nothing more)."""
    from ldm.inference import LatentCodec
    from ldm.training import DiffusionModule

    cfg = compose_train("experiment=laion_256", "text_encoder.pretrained=null")
    parts = build_denoising_parts(cfg)
    unet, text_encoder = parts["unet"], parts["text_encoder"]
    autoencoder = build_autoencoder(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(unet) - 865_910_724) / 865_910_724 < 0.005  # SD2's UNet
    assert abs(count(autoencoder) - 83_653_863) / 83_653_863 < 0.005  # SD's KL-f8
    assert text_encoder.width == 1024 and text_encoder.layer == "penultimate"
    assert autoencoder.downsample_factor == 8

    module = DiffusionModule(
        unet, parts["diffusion"], text_encoder, LatentCodec(autoencoder, scale=1.0), instantiate(cfg.optim)
    )
    batch = {"image": torch.rand(1, 3, 64, 64) * 2 - 1, "caption": ["a photo of a cat"]}
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in unet.parameters() if p.grad is not None]
    assert len(grads) == len(list(unet.parameters()))
    assert unet.out[-1].weight.grad.abs().sum() > 0  # the zero-initialised output conv is what learns first
    assert all(p.grad is None for p in text_encoder.parameters())


def test_stage1_without_lpips_weights_fails_naming_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    cfg = compose_train("experiment=vae_laion_256")
    with pytest.raises(InstantiationException, match="vgg16-397923af.pth") as err:
        instantiate(cfg.stage)
    assert isinstance(err.value.__cause__, MissingWeightsError)
    assert "stage.loss.lpips.vgg_weights=" in str(err.value)


def test_precision_resolver(monkeypatch):
    """`${ldm_precision:}`: fp32 on a CPU; `${ldm_precision:bf16-mixed}` (the quickstart's stage 1): bf16 on a
    CPU with native bf16, fp32 on one without (emulated bf16 would be slower)."""
    import ldm.utils.hydra_build as hb

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native in (True, False):
        monkeypatch.setattr(hb, "cpu_has_bf16", lambda native=native: native)
        assert compose_train("experiment=tiny").trainer.precision == "32-true"
        expected = "bf16-mixed" if native else "32-true"
        assert compose_train("experiment=vae_tiny").trainer.precision == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert compose_train("experiment=tiny").trainer.precision == "bf16-mixed"
