"""scripts/export.py on a real stage-2 checkpoint: the diffusers folder runs in diffusers' own
StableDiffusionPipeline and gives our sampler's images; the SD single file goes through diffusers' single-file
converters (the code that reads SD2 checkpoints) to the same networks."""

import importlib.util
import json
import logging
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.diffusion import DDIMSampler
from ldm.export import ExportedParts, export
from ldm.inference import TextToImage
from ldm.models import KLAutoencoder
from ldm.utils.checkpoint import atomic_save, load_bundle
from ldm.utils.sd_import import stage1_checkpoint

from .helpers import FAST, ROOT, compose_train

PROMPTS = ["a red circle on a blue background", "a green star on a white background"]

# SD's layout: 32 GroupNorm groups everywhere, widths multiples of 32, no pooled-text input
SD_SHAPED = [
    "unet.model_channels=32",
    "unet.head_dim=16",
    "unet.num_groups=32",
    "unet.pooled_dim=null",
]


@pytest.fixture(scope="module", autouse=True)
def quiet_diffusers():
    logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def sd_run(synthetic_shards, tmp_path_factory):
    """A 3-step stage-2 run of an SD-shaped tiny model (cosine schedule, v prediction) on an f2 autoencoder."""
    from ldm.training.run import train

    root = tmp_path_factory.mktemp("export_run")
    arch = dict(
        in_channels=3,
        out_channels=3,
        base_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        latent_channels=4,
        mid_attention=True,
        dropout=0.0,
        num_groups=32,
    )
    torch.manual_seed(0)
    vae = root / "vae.ckpt"
    atomic_save(
        stage1_checkpoint(arch, KLAutoencoder(**arch).state_dict(), latent_scale=0.8, resolution=32), vae
    )
    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={synthetic_shards[0]}",
        f"autoencoder_ckpt={vae}",
        "trainer.max_steps=3",
        "optim.lr=1e-2",  # a few large steps: the zero-initialised output layer must not stay near zero
        # SD pipelines force steps_offset=1, which moves "leading" DDIM steps by one; trailing walks ours exactly
        "sampler.timestep_spacing=trailing",
        *SD_SHAPED,
        *FAST,
        run_dir=str(root / "run"),
    )
    return train(cfg)["checkpoint"]


def test_diffusers_folder_runs_in_stable_diffusion_pipeline(sd_run, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    out = tmp_path / "model"
    # the raw weights: after 3 steps the EMA is still nearly the zero-output initial UNet
    summary = export(sd_run, out, format="diffusers", use_ema=False)
    assert summary["source"]["weights"] == "raw" and summary["source"]["global_step"] == 3
    assert not summary["notes"]
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.vae.config.scaling_factor == pytest.approx(load_bundle(sd_run)[0]["latent_scale"])
    assert pipe.scheduler.config.prediction_type == "v_prediction"

    ours, _ = TextToImage.from_checkpoint(sd_run, use_ema=False)
    torch.testing.assert_close(  # the exact training schedule (float32 in diffusers)
        pipe.scheduler.alphas_cumprod, ours.diffusion.alphas_cumprod.float(), rtol=1e-5, atol=1e-7
    )
    # the OpenCLIP tower as a transformers CLIPTextModel: same token ids, same conditioning (penultimate layer)
    ids = pipe.tokenizer(
        PROMPTS + [""], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    torch.testing.assert_close(ids, ours.text_encoder.tokenize(PROMPTS + [""]))
    with torch.no_grad():
        hidden = pipe.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(hidden, ours.text_encoder(PROMPTS + [""]).tokens, rtol=1e-5, atol=1e-5)

    assert pipe.scheduler.config.timestep_spacing == "trailing"
    # 5 steps: diffusers' DDIM steps back by T // steps, which equals the next visited timestep only when steps
    # divides T (1000 / 6 would make it step to 833 where the walk goes to 832)
    seeds, guidance, steps = [3, 4], 2.5, 5
    sampler = DDIMSampler(num_steps=steps, timestep_spacing="trailing")
    expected = ours(PROMPTS, sampler, guidance_scale=guidance, seeds=seeds)
    noise = torch.stack(
        [torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )  # as TextToImage draws it: seed i → noise of image i
    got = pipe(
        PROMPTS,
        latents=noise,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=32,
        width=32,
        output_type="pt",
    ).images
    assert got.shape == expected.shape == (2, 3, 32, 32)
    assert (expected[0] - expected[1]).abs().mean() > 0.01  # the prompts and seeds give different images
    # float32 schedule in diffusers vs our float64 one
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # ... while reading the network's output as the wrong parameterization is far outside that
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    off = pipe(PROMPTS, latents=noise, num_inference_steps=steps, guidance_scale=guidance, output_type="pt")
    assert (off.images - expected).abs().max() > 1e-2


def test_diffusers_unet_matches_ours_on_exported_weights(sd_run, tmp_path):
    """Tight check of the network alone (the pipeline test above also runs scheduler and VAE)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    export(sd_run, tmp_path / "m", format="diffusers", use_ema=False)
    parts = ExportedParts(sd_run, use_ema=False)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "m" / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5, 900]), torch.randn(2, 32, 128)
    with torch.no_grad():
        expected = parts.unet(x, t, context)
        got = unet(x, t, encoder_hidden_states=context).sample
    assert expected.abs().mean() > 1e-3  # the trained output layer is no longer zero
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    vae = AutoencoderKL.from_pretrained(tmp_path / "m" / "vae").eval()
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(x).sample, parts.autoencoder.decode(x), rtol=1e-4, atol=1e-5)


def test_sd_single_file_reads_back_through_diffusers_converters(sd_run, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    out = tmp_path / "model.safetensors"
    summary = export(sd_run, out, format="sd", dtype="float32")
    checkpoint = load_file(out)
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["ldm_export"])["global_step"] == 3
    original_config = yaml.safe_load(out.with_suffix(".yaml").read_text())
    assert summary["config"] == str(out.with_suffix(".yaml"))
    params = original_config["model"]["params"]
    assert params["parameterization"] == "v" and params["beta_schedule"] == "cosine"
    assert params["scale_factor"] == pytest.approx(load_bundle(sd_run)[0]["latent_scale"])  # the run's own
    prefixes = {k.split(".")[0] for k in checkpoint}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}

    parts = ExportedParts(sd_run)
    with pytest.warns(FutureWarning):
        unet_config = create_unet_diffusers_config_from_ldm(original_config, checkpoint, image_size=32)
    unet = UNet2DConditionModel(**unet_config).eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5, 900]), torch.randn(2, 32, 128)
    with torch.no_grad():
        torch.testing.assert_close(
            unet(x, t, encoder_hidden_states=context).sample, parts.unet(x, t, context), rtol=1e-5, atol=1e-7
        )
    with pytest.warns(FutureWarning):
        vae_config = create_vae_diffusers_config_from_ldm(original_config, checkpoint, image_size=32)
    assert vae_config["scaling_factor"] == pytest.approx(load_bundle(sd_run)[0]["latent_scale"])
    vae = AutoencoderKL(**vae_config).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(x).sample, parts.autoencoder.decode(x), rtol=1e-4, atol=1e-5)

    # the text tower sits where SD2's FrozenOpenCLIPEmbedder keeps its open_clip model
    clip = open_clip.create_model("ldm-tiny-text", pretrained=None)  # a plain CLIP, as SD2 builds it
    text = {
        k.removeprefix("cond_stage_model.model."): v for k, v in checkpoint.items() if k.startswith("cond_")
    }
    result = clip.load_state_dict(text, strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("visual.") or k == "logit_scale" for k in result.missing_keys)
    ours, _ = TextToImage.from_checkpoint(sd_run)
    tokens = ours.text_encoder.tokenize(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(tokens), ours.text_encoder(PROMPTS).pooled)


def cli_main(script: str, argv: list[str]):
    """A scripts/ entry point's main, in this process."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_export_cli_refuses_and_overwrites(sd_run, tmp_path, capsys):
    out = tmp_path / "m"
    cli_main("export.py", [sd_run, str(out), "--dtype", "float16"])
    unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in unet.values()} == {torch.float16}
    assert json.loads((out / "ldm_export.json").read_text())["weights"] == "ema"
    with pytest.raises(SystemExit) as exit_info:
        cli_main("export.py", [sd_run, str(out)])
    assert (
        exit_info.value.code == 2 and "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    )
    summary = cli_main("export.py", [sd_run, str(out), "--overwrite", "--raw"])
    assert summary["source"]["weights"] == "raw"
    assert {v.dtype for v in load_file(out / "unet" / "diffusion_pytorch_model.safetensors").values()} == {
        torch.float32
    }
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left beside it
    with pytest.raises(SystemExit):
        cli_main("export.py", [sd_run, str(tmp_path / "x.ckpt"), "--format", "sd"])
    assert "writes one .safetensors file" in capsys.readouterr().err


def test_sd_single_file_imports_back_to_the_same_model(sd_run, synthetic_shards, tmp_path):
    """export --format sd → import_sd.py → the same images from sample.py's pipeline, and a run that trains on."""
    from ldm.training.run import train

    export(sd_run, tmp_path / "model.safetensors", format="sd")
    bundle = cli_main("import_sd.py", [str(tmp_path / "model.safetensors"), str(tmp_path / "imported")])
    assert bundle["contents"] == "weights_only"
    assert bundle["latent_scale"] == pytest.approx(load_bundle(sd_run)[0]["latent_scale"])
    assert (
        bundle["text_encoder"]["weights_in_checkpoint"] and bundle["text_encoder"]["layer"] == "penultimate"
    )
    assert bundle["diffusion"]["prediction"] == "v" and bundle["diffusion"]["schedule"] == "cosine"

    original, _ = TextToImage.from_checkpoint(sd_run)
    imported, _ = TextToImage.from_checkpoint(tmp_path / "imported" / "model.ckpt")
    sampler = DDIMSampler(num_steps=4)
    expected = original(PROMPTS, sampler, guidance_scale=2.5, seeds=[0, 1])
    assert torch.equal(imported(PROMPTS, sampler, guidance_scale=2.5, seeds=[0, 1]), expected)

    cfg = compose_train(  # the imported model as the start of a new run (its autoencoder comes with it)
        "experiment=tiny",
        f"data.train_urls={synthetic_shards[0]}",
        f"init_from={tmp_path / 'imported' / 'model.ckpt'}",
        "trainer.max_steps=2",
        *SD_SHAPED,
        *FAST,
        run_dir=str(tmp_path / "run"),
    )
    result = train(cfg)
    _, ckpt = load_bundle(result["checkpoint"])
    first_conv = "unet.input_blocks.0.0.weight"
    moved = ckpt["state_dict"][first_conv] - imported.unet.state_dict()["input_blocks.0.0.weight"]
    assert 0 < moved.abs().max() < 0.05  # two small optimizer steps away from the imported weights

    with pytest.raises(SystemExit):  # no yaml beside the file: a clear error, nothing written
        cli_main("import_sd.py", [str(tmp_path / "imported" / "model.ckpt"), str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_text_tower_conversion_reads_what_no_tensor_records_and_refuses_what_it_cannot_hold(tmp_path):
    """Head count, activation and mask come from the open_clip config (registered name, local-dir folder, pretrained
    tag); a tower with weights CLIPTextModel has no place for (here: layer scale) is refused, not half converted."""
    from ldm.conditioning import FrozenOpenCLIPTextEncoder
    from ldm.conditioning.convert_openclip import hf_clip_text, openclip_text_cfg

    assert openclip_text_cfg("ldm-tiny-text")[0]["heads"] == 4
    assert openclip_text_cfg("ViT-H-14", "laion2b_s32b_b79k") == (
        {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
        False,
    )
    assert openclip_text_cfg("ViT-L-14", "openai")[1]  # OpenAI's CLIP weights use QuickGELU
    config = {"model_cfg": {"text_cfg": {"width": 256, "heads": 8, "layers": 2}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    assert openclip_text_cfg(f"local-dir:{tmp_path}")[0]["heads"] == 8
    with pytest.raises(ValueError, match="no open_clip config for text tower 'no-such-tower'"):
        openclip_text_cfg("no-such-tower")

    encoder = FrozenOpenCLIPTextEncoder("ldm-tiny-text", None, "penultimate")
    identity, state = (
        encoder.identity(),
        {k.removeprefix("text."): v for k, v in encoder.state_dict().items()},
    )
    config, weights = hf_clip_text(identity, state)
    assert (
        config["num_hidden_layers"] == 2
        and config["num_attention_heads"] == 4
        and config["hidden_act"] == "gelu"
    )
    assert not any(".layers.2." in k for k in weights)  # the last block: unused by the penultimate layer
    state["transformer.resblocks.0.ls_1.gamma"] = torch.ones(128)
    with pytest.raises(ValueError, match="no place for \\(transformer.resblocks.0.ls_1.gamma\\)"):
        hf_clip_text(identity, state)


# Stability's v2-inference.yaml (SD 2.x base, 512 px, eps), as published with the SD2 weights
SD2_INFERENCE_YAML = """
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""


def test_sd2_inference_config_reads_as_our_sd2_recipe():
    """SD2's own yaml gives exactly the networks of configs/unet/sd2_base.yaml and autoencoder/kl_f8.yaml, SD's
    schedule, ViT-H-14's penultimate layer and 512 px; what ldm cannot hold is refused by name."""
    from omegaconf import OmegaConf

    from ldm.models import CrossAttentionUNet
    from ldm.utils.sd_config import sd_model_nodes

    nodes = sd_model_nodes(yaml.safe_load(SD2_INFERENCE_YAML))
    ours = {
        group: OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / f"{group}.yaml"))
        for group in ("unet/sd2_base", "autoencoder/kl_f8")
    }
    unet = {**ours["unet/sd2_base"], "in_channels": 4, "out_channels": 4, "context_dim": 1024}
    unet.pop("_target_"), unet.pop("dropout"), unet.pop("gradient_checkpointing")
    assert nodes["unet"] == unet
    ae = ours["autoencoder/kl_f8"]
    ae.pop("_target_")
    assert nodes["autoencoder"] == ae
    with torch.device("meta"):
        assert sum(p.numel() for p in CrossAttentionUNet(**nodes["unet"]).parameters()) == 865_910_724
    assert nodes["diffusion"] == {
        "schedule": "scaled_linear",
        "num_timesteps": 1000,
        "prediction": "eps",
        "beta_start": 0.00085,
        "beta_end": 0.012,
    }
    assert (
        nodes["text_encoder"]["model_name"] == "ViT-H-14" and nodes["text_encoder"]["layer"] == "penultimate"
    )
    # the yaml's scale_factor (read, never assumed): import_sd_model stores it in the autoencoder checkpoint
    scale = yaml.safe_load(SD2_INFERENCE_YAML)["model"]["params"]["scale_factor"]
    assert nodes["latent_scale"] == scale and nodes["resolution"] == 512

    sd1 = yaml.safe_load(SD2_INFERENCE_YAML)
    sd1["model"]["params"]["cond_stage_config"]["target"] = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    with pytest.raises(ValueError, match="SD1's OpenAI CLIP tower does not import"):
        sd_model_nodes(sd1)
    inpaint = yaml.safe_load(SD2_INFERENCE_YAML)
    inpaint["model"]["params"]["conditioning_key"] = "hybrid"
    with pytest.raises(ValueError, match="only text-to-image"):
        sd_model_nodes(inpaint)


def test_a_qk_norm_model_trains_samples_and_is_not_exported(synthetic_shards, vae_ckpt, tmp_path):
    """unet.qk_norm=true: the checkpoint rebuilds the normalised UNet for sampling; export refuses it, since no
    SD or diffusers UNet normalises queries and keys."""
    from ldm.training.run import train

    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={synthetic_shards[0]}",
        f"autoencoder_ckpt={vae_ckpt}",
        "trainer.max_steps=2",
        "unet.qk_norm=true",
        "callbacks.sample_grid=null",
        *FAST,
        run_dir=str(tmp_path / "run"),
    )
    ckpt = train(cfg)["checkpoint"]
    state = load_bundle(ckpt)[1]["state_dict"]
    assert any(k.startswith("ema.module.") and ".norm_q." in k for k in state)
    pipe, _ = TextToImage.from_checkpoint(ckpt)
    assert pipe.unet.qk_norm
    images = pipe(["a red circle"], DDIMSampler(num_steps=2), guidance_scale=2.0, seeds=[0])
    assert torch.isfinite(images).all()
    for fmt, out in (("diffusers", tmp_path / "d"), ("sd", tmp_path / "m.safetensors")):
        with pytest.raises(ValueError, match="qk_norm"):
            export(ckpt, out, format=fmt)
        assert not out.exists()


@pytest.fixture(scope="module")
def pooled_run(synthetic_shards, vae_ckpt, tmp_path_factory):
    """A 3-step stage-2 run of the quickstart's tiny model, whose UNet adds the pooled text embedding
    (experiment=tiny: unet.pooled_dim=auto) to its timestep embedding."""
    from ldm.training.run import train

    cfg = compose_train(
        "experiment=tiny",
        f"data.train_urls={synthetic_shards[0]}",
        f"autoencoder_ckpt={vae_ckpt}",
        "trainer.max_steps=3",
        "optim.lr=1e-2",  # a few large steps: the zero-initialised output layer must not stay near zero
        "callbacks.sample_grid=null",
        *FAST,
        run_dir=str(tmp_path_factory.mktemp("pooled_run") / "run"),
    )
    return train(cfg)["checkpoint"]


def test_pooled_text_unet_exports_a_text_encoder_that_computes_pooled(pooled_run, tmp_path):
    """A UNet with a pooled-text input needs class_labels=pooled: the folder's text encoder is then a whole
    CLIPTextModelWithProjection whose text_embeds is ldm's pooled, while the tokens the UNet attends to are its
    penultimate layer through the final LayerNorm (diffusers' clip_skip=1), so diffusers alone conditions it."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    out = tmp_path / "m"
    summary = export(pooled_run, out, use_ema=False)
    assert summary["clip_skip"] == 1
    assert any("class_labels=pooled" in note and "clip_skip=1" in note for note in summary["notes"])
    assert json.loads((out / "ldm_export.json").read_text())["clip_skip"] == 1
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]

    text_encoder = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert text_encoder.config.num_hidden_layers == 3  # every block of ldm-tiny-text: pooled reads the last
    ours, _ = TextToImage.from_checkpoint(pooled_run, use_ema=False)
    # the empty prompt (guidance's null) and one the 32-token context cuts: the end token moves to the last place
    prompts = [*PROMPTS, "", " ".join(["a small red circle beside a large blue square"] * 5)]
    assert ours.text_encoder.truncated(prompts).tolist() == [False, False, False, True]
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    torch.testing.assert_close(ids, ours.text_encoder.tokenize(prompts))
    cond = ours.text_encoder(prompts)
    with torch.no_grad():
        hf = text_encoder(ids, output_hidden_states=True)
        tokens = text_encoder.text_model.final_layer_norm(hf.hidden_states[-2])
    torch.testing.assert_close(hf.text_embeds, cond.pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, cond.tokens, rtol=1e-5, atol=1e-5)
    # ... which is what diffusers' own prompt encoding gives with clip_skip=1
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False, clip_skip=1)
    torch.testing.assert_close(embeds, cond.tokens, rtol=1e-5, atol=1e-5)

    unet = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    assert unet.config.class_embed_type == "simple_projection"
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 300, 700, 999])
    with torch.no_grad():
        expected = ours.unet(x, t, cond.tokens, pooled=cond.pooled)
        got = unet(x, t, encoder_hidden_states=tokens, class_labels=hf.text_embeds).sample
        unpooled = ours.unet(x, t, cond.tokens, pooled=torch.zeros_like(cond.pooled))
    assert expected.abs().mean() > 1e-3 and (expected - unpooled).abs().max() > 1e-4  # pooled matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
