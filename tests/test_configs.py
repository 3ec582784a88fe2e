"""Every config group option and every experiment composes, passes the key check and instantiates."""

import re
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from ldm.conditioning import MissingWeightsError
from ldm.training.parallel import scale_lr
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


# The global batch each experiment's optim.lr was taken for, and the devices that batch assumes (8-GPU nodes ×
# the `trainer.num_nodes=` of the experiment's "Run:" comment, or one CPU process for the quickstart). laion_*:
# MosaicML's SD-2-base-256/512 yamls, lr 1e-4 at dataset.train_batch_size 2048; vae_laion_256: CompVis' kl-f8,
# lr = 4.5e-6 per image of the global batch; the quickstart's lrs were tuned at batch 32 on one process.
RECIPE_BATCH = {
    "laion_256": (2048, 64),
    "laion_512": (2048, 64),
    "laion_1024": (2048, 64),
    "inpaint_laion_256": (2048, 64),
    "vae_laion_256": (96, 8),
    "tiny": (32, 1),
    "inpaint_tiny": (32, 1),
    "vae_tiny": (32, 1),
}
COMPVIS_BASE_LR = 4.5e-6  # configs/autoencoder/autoencoder_kl_32x32x4.yaml: base_learning_rate, per image


def test_every_experiment_states_the_batch_of_its_lr():
    assert set(RECIPE_BATCH) == set(EXPERIMENTS), (
        "add the new experiment's (global batch, devices) to RECIPE_BATCH"
    )


def _run_comment_devices(experiment: str) -> int | None:
    """GPUs the experiment's "Run:" comment launches (8 per node), following its defaults list to a parent."""
    text = (CONFIGS / "experiment" / f"{experiment}.yaml").read_text()
    if "Run: python train.py" in text:
        nodes = re.search(r"trainer\.num_nodes=(\d+)", text)
        return 8 * (int(nodes.group(1)) if nodes else 1)
    parent = re.search(r"^defaults:\n  - (\w+)$", text, re.MULTILINE)
    return _run_comment_devices(parent.group(1)) if parent else None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_base_batch_size_is_the_global_batch_the_lr_was_set_for(experiment):
    """lr_scaling=linear|sqrt rescales optim.lr by global batch / base_batch_size: base_batch_size must be the batch
    the lr was taken for, and the experiment's own layout (per-device batch × devices × accumulation) must make it."""
    batch, devices = RECIPE_BATCH[experiment]
    cfg = compose_train(f"experiment={experiment}")
    assert cfg.base_batch_size == batch
    assert cfg.data.batch_size * devices * cfg.trainer.accumulate_grad_batches == batch
    if devices > 1:
        assert _run_comment_devices(experiment) == devices, "the Run: comment launches another number of GPUs"


def _derived(cfg, world_size: int, accumulate: int | None = None) -> dict:
    module = SimpleNamespace(optim_settings=instantiate(cfg.optim))
    trainer = SimpleNamespace(
        world_size=world_size,
        num_nodes=max(1, world_size // 8),
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches if accumulate is None else accumulate,
        strategy=object(),
        precision="bf16-mixed",
    )
    return scale_lr(cfg, module, trainer)


@pytest.mark.parametrize("experiment", ["laion_256", "laion_512", "laion_1024", "vae_laion_256"])
def test_lr_scaling_keeps_the_recipe_lr_on_the_recipe_layout(experiment):
    """What the logged config's `derived` shows: on the recipe's GPUs the lr is the recipe's under every rule; on
    half of them `linear` halves it."""
    batch, devices = RECIPE_BATCH[experiment]
    for rule in ("none", "linear", "sqrt"):
        cfg = compose_train(f"experiment={experiment}", f"lr_scaling={rule}")
        derived = _derived(cfg, devices)
        assert derived["global_batch_size"] == batch
        assert derived["lr"] == pytest.approx(cfg.optim.lr)
    half = _derived(compose_train(f"experiment={experiment}", "lr_scaling=linear"), devices // 2)
    assert half["global_batch_size"] == batch // 2 and half["lr"] == pytest.approx(cfg.optim.lr / 2)


def test_vae_laion_256_lr_is_compvis_per_image_lr_times_the_global_batch():
    """CompVis' main.py --scale_lr: lr = accumulate × GPUs × per-GPU batch × 4.5e-6; with lr_scaling=linear ldm
    gives the same lr for any layout."""
    cfg = compose_train("experiment=vae_laion_256")
    assert cfg.optim.lr == pytest.approx(COMPVIS_BASE_LR * cfg.base_batch_size)
    for world_size, accumulate in ((8, 1), (8, 2), (16, 1), (4, 1)):
        cfg = compose_train("experiment=vae_laion_256", "lr_scaling=linear")
        derived = _derived(cfg, world_size, accumulate)
        assert derived["lr"] == pytest.approx(COMPVIS_BASE_LR * accumulate * world_size * cfg.data.batch_size)


def test_psnr_figures_in_config_comments_are_measured_ones():
    """A comment that quotes PSNRs (a line with "dB": each xx.x figure on it) quotes ones docs/benchmarks.md reports."""
    docs = (CONFIGS.parent / "docs" / "benchmarks.md").read_text()
    quoted = {
        (path.relative_to(CONFIGS), figure)
        for path in CONFIGS.rglob("*.yaml")
        for line in path.read_text().splitlines()
        if " dB" in line
        for figure in re.findall(r"\b(\d\d\.\d)\b", line)
    }
    assert quoted, "no PSNR quoted in configs/ (update this test if that is intended)"
    assert {(where, f) for where, f in quoted if f"{f} dB" not in docs} == set()


def test_the_sd2_recipe_numbers_the_laion_comments_cite():
    """MosaicML's SD-2-base-256/512 yamls (lr, weight decay, warm-up, caption drop, steps), CompVis' LitEma (decay
    0.9999 with the (1 + n) / (10 + n) warm-up) and CompVis' kl-f8 (batch 12 per GPU, GAN from step 50001)."""
    cfg = compose_train("experiment=laion_256")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (1e-4, 0.01, 10_000)
    assert cfg.optim.decay == "constant" and cfg.stage.cond_drop_prob == 0.1
    assert (cfg.stage.ema_decay, cfg.stage.ema_warmup) == (0.9999, True)
    assert cfg.trainer.max_steps == 550_000
    assert compose_train("experiment=laion_512").trainer.max_steps == 850_000
    vae = compose_train("experiment=vae_laion_256")
    assert (vae.data.batch_size, vae.stage.loss.disc_start, vae.stage.loss.kl_weight) == (12, 50_001, 1e-6)


def test_ddim_leading_grid_is_sds_one_step_earlier():
    """configs/sampler/ddim.yaml: "leading" is the DDIM paper's grid (diffusers, steps_offset=0); Stable Diffusion's
    sampler (CompVis make_ddim_timesteps: range(0, T, T // S) + 1) walks each timestep plus one."""
    sampler = instantiate(compose_train("experiment=laion_256").sampler)
    assert sampler.timestep_spacing == "leading"
    compvis = sorted((t + 1 for t in range(0, 1000, 1000 // 50)), reverse=True)
    assert [t + 1 for t in sampler.timesteps(1000)] == compvis
    assert sampler.timesteps(1000)[0] == 980 and compvis[0] == 981


def test_tiny_unet_sizes_the_comments_state():
    """experiment=tiny's 48-channel UNet is 2.5M parameters (the quickstart's, docs/benchmarks.md), configs/unet/tiny's
    64-channel one 4.3M."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    tiny = build_denoising_parts(compose_train("experiment=tiny"))["unet"]
    assert round(count(tiny) / 1e6, 1) == 2.5
    assert "2.5M-parameter" in (CONFIGS / "experiment" / "tiny.yaml").read_text()
    wide = compose_train("unet=tiny", "text_encoder=tiny_random")  # the group as it stands, no experiment
    assert round(count(build_denoising_parts(wide)["unet"]) / 1e6, 1) == 4.3
    assert "4.3M parameters" in (CONFIGS / "unet" / "tiny.yaml").read_text()


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
