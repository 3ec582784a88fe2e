"""Export a stage-2 checkpoint for the tools the rest of the field uses: a diffusers folder or an SD single file.

- ``diffusers``: a `StableDiffusionPipeline` folder: `unet/` (`UNet2DConditionModel`), `vae/` (`AutoencoderKL`, with
  our latent scale and shift as `scaling_factor` / `shift_factor`), `scheduler/` (`DDIMScheduler` with the exact
  training betas, the prediction type and the configured sampler's timestep spacing; a rectified-flow model gets
  `FlowMatchEulerDiscreteScheduler`, which the pipeline cannot drive: the export notes say so), `text_encoder/` + `tokenizer/`
  (the OpenCLIP text tower as a `transformers` CLIPTextModel, as Stability converted SD2's: with `layer:
  penultimate` the last block is dropped, so its final-LayerNorm output is SD2's conditioning; the same BPE
  vocabulary, padded with "!" = id 0 as open_clip pads), `model_index.json`. `StableDiffusionPipeline.
  from_pretrained(folder)` then takes prompt strings. A UNet that also takes the pooled text embedding
  (`pooled_dim`: diffusers' `class_embed_type="simple_projection"`, called with `class_labels=pooled`) gets the whole
  tower with its projection as a `CLIPTextModelWithProjection` instead: `text_embeds` is the pooled embedding, and the
  tokens are `final_layer_norm(hidden_states[-2])` for the penultimate layer, diffusers' `clip_skip=1` (recorded as
  `clip_skip` in `ldm_export.json`; 0 for the last layer).
- ``sd``: one `.safetensors` in the CompVis layout of Stable Diffusion 2 (`model.diffusion_model.*`,
  `first_stage_model.*`, `cond_stage_model.model.*` = the OpenCLIP text tower, as SD2's FrozenOpenCLIPEmbedder
  holds it) plus its inference `.yaml` (`scale_factor` = our latent scale, `parameterization`, schedule). This is the
  file ComfyUI and AUTOMATIC1111 load and diffusers' `from_single_file` converts. It holds only what SD2's layout
  can say: 32-group GroupNorms, no pooled-text or micro-conditioning inputs, zero latent shift, and a schedule
  CompVis can name (scaled_linear, linear or cosine, without zero-terminal-SNR rescaling or a schedule shift).

Both take the EMA weights by default. Every export is checked before it is written (`ldm.models.convert_unet`
refuses architectures with no exact twin, naming the reason); the tests load both with diffusers' own classes and
converters and compare outputs with ours.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch
from torch import Tensor

from ldm.conditioning.convert_openclip import hf_clip_text, write_clip_tokenizer
from ldm.diffusion import GaussianDiffusion, RectifiedFlow
from ldm.inference import is_inpainting_unet
from ldm.models.convert_unet import (
    COMPVIS_UNET_PREFIX,
    compvis_unet_params,
    diffusers_unet_config,
    group_counts,
    unet_to_layout,
)
from ldm.models.convert_vae import WRAPPER_PREFIX as COMPVIS_VAE_PREFIX
from ldm.models.convert_vae import diffusers_vae_config, ldm_to_diffusers
from ldm.utils.checkpoint import (
    CONTENTS_KEY,
    WEIGHTS_ONLY,
    file_sha256,
    fsync_dir,
    fsync_file,
    load_bundle,
    publish,
    save_safetensors,
    submodule_state,
)
from ldm.utils.sd_config import COMPVIS_TEXT_PREFIX, compvis_schedule, sd_inference_config

Format = Literal["diffusers", "sd"]
FORMATS = ("diffusers", "sd")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers whose configs carry every field written here


class ExportedParts:
    """A diffusion checkpoint's networks, rebuilt from its stored config; the text tower's weights are read only
    when asked for (`text_state`: a pretrained tower is loaded from its tag or file then)."""

    def __init__(self, path: str | os.PathLike, use_ema: bool = True):
        from ldm.utils.hydra_build import build_autoencoder, build_denoising_parts

        self.path = Path(path)
        self.bundle, ckpt = load_bundle(path)
        if self.bundle.get("stage") != "diffusion":
            raise ValueError(
                f"{path} is a '{self.bundle.get('stage')}' checkpoint; export needs a diffusion (stage 2) one"
            )
        if not use_ema and self.bundle.get(CONTENTS_KEY) == WEIGHTS_ONLY:
            raise ValueError(f"{path} is a weights-only checkpoint: it holds the EMA weights only (use_ema)")
        self.cfg = self.bundle["config"]
        self.state = ckpt["state_dict"]
        self.use_ema = use_ema
        self.unet_state = submodule_state(self.state, "ema.module" if use_ema else "unet")
        pooled = self.unet_state.get("pooled_proj.weight")
        stand_in = SimpleNamespace(  # what the UNet's constructor reads off a text encoder
            width=self.bundle["text_encoder"]["width"], pooled_dim=None if pooled is None else pooled.shape[1]
        )
        parts = build_denoising_parts(self.cfg, text_encoder=stand_in)
        self.unet = parts["unet"].eval()
        if is_inpainting_unet(self.unet):
            raise ValueError(
                f"{path} is an inpainting model: its extra input is [mask, latents zeroed where masked], while SD's "
                "and diffusers' inpainting pipelines encode the masked image instead; exporting it is not supported"
            )
        if self.unet.qk_norm:
            raise ValueError(
                f"{path} has a UNet with qk_norm (RMSNorm on queries and keys): neither SD's CompVis UNet nor "
                "diffusers' UNet2DConditionModel has it, so no export would compute the same function; sample it "
                "with sample.py"
            )
        self.unet.load_state_dict(self.unet_state)
        self.diffusion: GaussianDiffusion = parts["diffusion"]
        self.autoencoder = build_autoencoder(self.cfg).eval()
        codec = submodule_state(self.state, "codec")
        self.autoencoder.load_state_dict(submodule_state(codec, "autoencoder"))
        self.latent_scale = float(codec["scale"])
        self.latent_shift = float(codec["shift"])
        self.resolution = int(self.cfg["data"]["resolution"])
        self.latent_size = self.resolution // self.autoencoder.downsample_factor
        self.step = ckpt.get("global_step")

    @property
    def text_identity(self) -> dict:
        return dict(self.bundle["text_encoder"])

    def text_state(self) -> dict[str, Tensor]:
        """The OpenCLIP text tower's weights, names as in an open_clip CLIP model (no `text.` prefix): from the
        checkpoint for a randomly initialised tower, else loaded from its tag or file (MissingWeightsError says
        which file is missing offline)."""
        if self.text_identity["weights_in_checkpoint"]:
            state = submodule_state(self.state, "text_encoder")
        else:
            from ldm.utils.hydra_build import build_text_encoder

            state = build_text_encoder(self.cfg).state_dict()
        return submodule_state(state, "text")

    @functools.cached_property
    def source(self) -> dict:
        """Provenance: the source checkpoint (hashed once: an SD2-size one is gigabytes), its step, which weights."""
        return {
            "checkpoint": str(self.path.resolve()),
            "sha256": file_sha256(self.path),
            "global_step": self.step,
            "weights": "ema" if self.use_ema else "raw",
            "diffusion": self.diffusion.describe(),
            "text_encoder": self.text_identity,
            "resolution": self.resolution,
        }


def export(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    format: Format = "diffusers",
    use_ema: bool = True,
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict:
    """Write `ckpt` as `format` to `out` (a folder for diffusers, a `.safetensors` path for sd); returns a summary.

    Everything is written to a temporary sibling and renamed into place at the end: an interrupted export leaves
    no half-written model behind."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    out = Path(out)
    if format == "sd" and out.suffix != ".safetensors":
        raise ValueError(f"the sd format writes one .safetensors file; got out={out}")
    targets = [out] if format == "diffusers" else [out, out.with_suffix(".yaml")]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} exists; pass overwrite=True (--overwrite) to replace it"
        )
    parts = ExportedParts(ckpt, use_ema=use_ema)
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "diffusers":
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            summary = _write_diffusers(parts, tmp, DTYPES[dtype])
            _fsync_tree(tmp)
            _replace_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        summary = _write_sd(parts, out, DTYPES[dtype])
    return {"format": format, "out": str(out), "dtype": dtype, **summary, "source": parts.source}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(root: Path) -> None:
    """Every file and folder under `root` on disk, before a rename makes the export visible."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(folder)


def _replace_folder(new: Path, out: Path) -> None:
    """Rename folder `new` to `out`. A folder cannot be renamed over a non-empty one, so a previous `out` is first
    renamed aside and deleted only once `new` is in place: a failure puts it back, and a crash between the two
    renames leaves it whole beside, as `.<name>.old-<pid>`: the previous export is never deleted before the new
    one is in place."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    had_old = os.path.lexists(out)
    if had_old:
        _remove(old)
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if had_old:
            os.replace(old, out)
        raise
    fsync_dir(out.parent)
    if had_old:
        _remove(old)


def _cast(state: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _vae_config(parts: ExportedParts) -> dict:
    config = dict(parts.cfg["autoencoder"])
    config.pop("_target_", None)
    groups = group_counts(parts.autoencoder)
    if len(groups) != 1:
        raise ValueError(
            f"the autoencoder's GroupNorms use {sorted(groups)} groups (a narrow width fell back to a divisor of "
            "num_groups); diffusers' AutoencoderKL uses one count: it cannot be exported exactly"
        )
    config["num_groups"] = groups.pop()
    return config


def scheduler_config(parts: ExportedParts) -> dict:
    """diffusers `DDIMScheduler` config: the exact training betas (any schedule, rescaling or shift), prediction
    type, and the spacing of our DDIM sampler (alpha_bar after the last step = 1, as ours).

    A rectified-flow model gets `FlowMatchEulerDiscreteScheduler` with its shift: its training noise levels and
    time inputs are ours (``ldm.diffusion.flow``)."""
    if isinstance(parts.diffusion, RectifiedFlow):
        return {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": parts.diffusion.num_timesteps,
            "shift": parts.diffusion.schedule_shift,
            "use_dynamic_shifting": False,
        }
    sampler = parts.cfg.get("sampler") or {}
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": parts.diffusion.num_timesteps,
        "trained_betas": [float(b) for b in parts.diffusion.betas],
        "beta_schedule": "linear",  # ignored when trained_betas are given
        "prediction_type": DIFFUSERS_PREDICTION[parts.diffusion.prediction],
        "timestep_spacing": sampler.get("timestep_spacing", "leading"),
        # diffusers' SD pipelines force steps_offset=1 (with a deprecation warning otherwise): "leading" spacing then
        # walks t + 1 where our DDIM walks t, a one-step shift of SD's own convention; trailing and linspace spacings
        # ignore the offset and walk exactly our timesteps
        "steps_offset": 1,
        "set_alpha_to_one": True,
        "clip_sample": False,
        "thresholding": False,
        "rescale_betas_zero_snr": False,  # already in trained_betas when the model was trained with it
    }


def _write_diffusers(parts: ExportedParts, root: Path, dtype: torch.dtype) -> dict:
    unet_config = diffusers_unet_config(parts.unet, parts.latent_size)
    vae = _vae_config(parts)
    vae_config = diffusers_vae_config(vae, parts.latent_scale, parts.latent_shift, parts.resolution)
    unet_state = unet_to_layout(parts.unet.state_dict(), parts.unet, "diffusers")
    vae_state = ldm_to_diffusers(parts.autoencoder.state_dict())
    for name, config, state, cls in (
        ("unet", unet_config, unet_state, "UNet2DConditionModel"),
        ("vae", vae_config, vae_state, "AutoencoderKL"),
    ):
        _write_json(
            root / name / "config.json",
            {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, **config},
        )
        save_safetensors(_cast(state, dtype), root / name / "diffusion_pytorch_model.safetensors")
    scheduler = scheduler_config(parts)
    _write_json(root / "scheduler" / "scheduler_config.json", scheduler)
    # a pooled-text UNet needs the tower's pooled embedding: the whole tower and its projection, the conditioning
    # layer then read as diffusers' clip_skip (hidden_states[-(clip_skip + 1)] through the final LayerNorm)
    pooled = parts.unet.pooled_proj is not None
    clip_skip = (1 if parts.text_identity["layer"] == "penultimate" else 0) if pooled else None
    text_config, text_state = hf_clip_text(parts.text_identity, parts.text_state(), with_projection=pooled)
    _write_json(root / "text_encoder" / "config.json", text_config)
    save_safetensors(_cast(text_state, dtype), root / "text_encoder" / "model.safetensors")
    write_clip_tokenizer(root / "tokenizer", parts.text_identity, text_config["max_position_embeddings"])
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "text_encoder": ["transformers", text_config["architectures"][0]],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    _write_json(root / "model_index.json", model_index)
    _write_json(
        root / "ldm_export.json",
        parts.source if clip_skip is None else {**parts.source, "clip_skip": clip_skip},
    )
    notes = []
    if isinstance(parts.diffusion, RectifiedFlow):
        notes.append(
            "rectified flow: the scheduler is FlowMatchEulerDiscreteScheduler, which StableDiffusionPipeline cannot "
            "drive (it has no init_noise_sigma); loop over scheduler.timesteps yourself, calling the UNet with "
            "timestep=t and taking scheduler.step(v, t, latents)"
        )
    if pooled:
        tokens = (
            "text_encoder.text_model.final_layer_norm(out.hidden_states[-2]) (penultimate layer)"
            if clip_skip
            else "out.last_hidden_state"
        )
        notes.append(
            "the UNet adds a projection of the pooled text embedding (class_embed_type='simple_projection'): "
            "call it with class_labels=pooled; StableDiffusionPipeline does not pass it, so loop over the scheduler "
            "yourself. The text encoder is the whole tower as a CLIPTextModelWithProjection: with out = "
            "text_encoder(ids, output_hidden_states=True), pooled = out.text_embeds and encoder_hidden_states = "
            f"{tokens}, which is what encode_prompt(..., clip_skip={clip_skip}) gives"
        )
    if parts.latent_shift:
        notes.append(
            f"latent shift {parts.latent_shift:g} is stored as vae shift_factor; StableDiffusionPipeline ignores "
            "it (it divides by scaling_factor only)"
        )
    summary = {"unet_config": unet_config, "vae_config": vae_config, "notes": notes}
    if clip_skip is not None:
        summary["clip_skip"] = clip_skip
    return summary


def _sd_config(parts: ExportedParts) -> dict:
    """The SD inference yaml of `parts`; a ValueError for what SD's layout cannot say (the schedule first)."""
    diffusion = {**parts.cfg["diffusion"], **parts.diffusion.describe()}
    compvis_schedule(diffusion)
    vae = _vae_config(parts)
    config = sd_inference_config(
        compvis_unet_params(parts.unet, parts.latent_size),
        vae,
        diffusion,
        parts.text_identity,
        parts.latent_scale,
        parts.latent_size,
        parts.resolution,
    )
    if parts.latent_shift:
        raise ValueError(
            f"latent shift {parts.latent_shift:g}: SD's layout has a scale_factor only; export in diffusers format"
        )
    if vae["num_groups"] != 32:
        raise ValueError(
            f"the autoencoder's GroupNorms have {vae['num_groups']} groups; CompVis' AutoencoderKL always uses 32: "
            "export in diffusers format instead"
        )
    return config


def _write_sd(parts: ExportedParts, out: Path, dtype: torch.dtype) -> dict:
    import yaml

    config = _sd_config(parts)  # checks everything before the text tower is loaded
    state = {
        COMPVIS_UNET_PREFIX + k: v
        for k, v in unet_to_layout(parts.unet.state_dict(), parts.unet, "compvis").items()
    }
    state.update({COMPVIS_VAE_PREFIX + k: v for k, v in parts.autoencoder.state_dict().items()})
    state.update({COMPVIS_TEXT_PREFIX + k: v for k, v in parts.text_state().items()})
    metadata = {"format": "pt", "ldm_export": json.dumps(parts.source)}
    yaml_path = out.with_suffix(".yaml")
    tmp, tmp_yaml = (p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in (out, yaml_path))
    try:
        save_safetensors(_cast(state, dtype), tmp, metadata=metadata)
        tmp_yaml.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        publish(tmp, out)
        publish(tmp_yaml, yaml_path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_yaml.unlink(missing_ok=True)
    return {"config": str(yaml_path), "tensors": len(state), "notes": []}
