"""The sampling path (`TextToImage`, `sample.py`) against independent computations: diffusers' schedulers for
img2img and inpainting, the noise a stochastic sampler is handed, and how the CLI reads its prompts."""

import torch
from diffusers import DDIMScheduler
from hydra import compose, initialize_config_dir

from ldm.conditioning import Conditioning, FrozenOpenCLIPTextEncoder
from ldm.diffusion import DDIMSampler, GaussianDiffusion
from ldm.inference import LatentCodec, TextToImage, read_prompts
from ldm.models import CrossAttentionUNet, KLAutoencoder

from .helpers import CONFIGS


def tiny_pipe(image_size: int = 16) -> TextToImage:
    """Random tiny parts (autoencoder factor 2, UNet factor 2), the weights large enough that the prompt matters."""
    torch.manual_seed(0)
    text = FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=None, layer="last")
    autoencoder = KLAutoencoder(
        base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, mid_attention=False
    )
    unet = CrossAttentionUNet(
        in_channels=4,
        out_channels=4,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        head_dim=8,
        context_dim=text.width,
        num_groups=8,
    )
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    codec = LatentCodec(autoencoder, scale=0.7, shift=0.1)
    return TextToImage(unet.eval(), codec, text, GaussianDiffusion(prediction="eps"), image_size)


def test_a_prompt_given_as_one_string_is_one_prompt():
    """`sample.py prompts='a red circle'` (Hydra reads it as a string, not a list) samples that prompt, not one
    prompt per character; `TextToImage` takes a single string too, as diffusers' pipelines do."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("sample", overrides=["ckpt=x.ckpt", "prompts=a red circle"])
    assert read_prompts(cfg.prompts) == ["a red circle"]
    assert read_prompts(["a red circle", "a blue star"]) == ["a red circle", "a blue star"]
    pipe, sampler = tiny_pipe(), DDIMSampler(num_steps=2)
    one = pipe("a red circle", sampler, 3.0, seeds=[4])
    assert one.shape[0] == 1
    torch.testing.assert_close(one, pipe(["a red circle"], sampler, 3.0, seeds=[4]), rtol=0, atol=0)


def test_step_noise_is_independent_of_the_initial_noise():
    """The generator a stochastic sampler draws its fresh noise from must not replay an image's initial noise: with
    the step-noise generator seeded like the first image's noise (CPU), the first step's fresh noise of that image
    was its initial noise again (correlation 1), so it started with too much noise along it."""
    pipe = tiny_pipe(image_size=32)  # latents 4 x 16 x 16: a correlation's sd is 1/32
    seen = {}

    def recording_sampler(model_fn, diffusion, noise, generator=None, progress=False, init=None):
        seen["noise"] = noise.clone()
        seen["step"] = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
        return noise

    pipe(["a", "b", "c"], recording_sampler, 3.0, seeds=[5, 6, 5])
    noise, step = seen["noise"].flatten(1), seen["step"].flatten(1)
    for i in range(3):
        for j in range(3):
            corr = torch.corrcoef(torch.stack([noise[i], step[j]]))[0, 1].item()
            assert abs(corr) < 0.2, (i, j, corr)
    # still one generator per batch, seeded from the batch's first seed: the same batch draws the same step noise
    pipe(["a", "b", "c"], recording_sampler, 3.0, seeds=[5, 6, 5])
    torch.testing.assert_close(seen["step"].flatten(1), step, rtol=0, atol=0)


def test_img2img_and_inpainting_match_a_diffusers_loop():
    """Classifier-free guidance ([uncond; cond] in diffusers' order, eps_u + s (eps_c - eps_u)), img2img's start
    (diffusers: int(steps * strength) steps from add_noise at the first of them) and inpainting by replacement (the
    legacy/4-channel branch of StableDiffusionInpaintPipeline: known latents noised to the next timestep with the
    initial noise, exact after the last step), all against diffusers' DDIMScheduler; the mask reaches the latents
    by max-pooling (a cell is repainted when any of its pixels is, docs/sampling.md)."""
    pipe, steps, scale = tiny_pipe(), 10, 4.0
    prompts, seeds = ["a cat", "a dog"], [3, 4]
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 5:] = 1  # column 5 repaints latent column 2 whole

    def diffusers_loop(strength: float, mask: torch.Tensor | None) -> torch.Tensor:
        scheduler = DDIMScheduler(
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=True,
            steps_offset=0,
            timestep_spacing="leading",
        )
        scheduler.set_timesteps(steps)
        t_start = steps - min(int(steps * strength), steps)
        timesteps = scheduler.timesteps[t_start:]
        noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
        image_latents = ((pipe.codec.autoencoder.encode(image * 2 - 1).mode() - 0.1) * 0.7).expand(
            2, -1, -1, -1
        )
        latents = noise if strength == 1.0 else scheduler.add_noise(image_latents, noise, timesteps[:1])
        both = Conditioning.cat([pipe.text_encoder([""] * 2), pipe.text_encoder(prompts)])
        latent_mask = None if mask is None else torch.nn.functional.max_pool2d(mask, 2)
        for i, t in enumerate(timesteps):
            out = pipe.unet(torch.cat([latents] * 2), torch.full((4,), int(t)), both.tokens)
            eps_uncond, eps_cond = out.chunk(2)
            latents = scheduler.step(eps_uncond + scale * (eps_cond - eps_uncond), t, latents).prev_sample
            if latent_mask is not None:
                known = image_latents
                if i < len(timesteps) - 1:
                    known = scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
                latents = (1 - latent_mask) * known + latent_mask * latents
        decoded = pipe.codec.autoencoder.decode(latents / 0.7 + 0.1)
        return (decoded / 2 + 0.5).clamp(0, 1)

    sampler = DDIMSampler(num_steps=steps)
    for strength, m in ((0.5, None), (0.75, None), (1.0, None), (0.6, mask), (1.0, mask)):
        ours = pipe(
            prompts,
            sampler,
            scale,
            seeds,
            init_image=image,
            strength=strength,
            mask=m,
            keep_unmasked_pixels=False,
        )
        torch.testing.assert_close(ours, diffusers_loop(strength, m), rtol=0, atol=1e-5)
    pasted = pipe(prompts, sampler, scale, seeds, init_image=image, strength=0.6, mask=mask)
    torch.testing.assert_close(pasted[..., :5], image[..., :5].expand(2, -1, -1, -1), rtol=0, atol=0)


def test_a_soft_mask_is_cut_at_one_half_for_the_latents():
    """diffusers' inpainting pipelines binarise the mask at 0.5; fractional values would reach the per-step
    replacement and an inpainting UNet's mask channel, which only ever saw 0 and 1 in training."""
    pipe = tiny_pipe()
    image = torch.rand(1, 3, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 0.3  # below one half: kept
    mask[..., 8:12] = 0.7  # above: repainted
    init = pipe._init(image, 1.0, mask, 1)
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., 4:6] = 1.0  # latent columns 4-5 cover pixel columns 8-11 (factor 2)
    assert torch.equal(init.mask, expected)
