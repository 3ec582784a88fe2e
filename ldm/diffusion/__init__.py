"""Diffusion math: noise schedules, the Gaussian forward process and its parameterizations, samplers, guidance.

Pure tensor code (torch, math, einops): the network is a callable and the conditioning is opaque.
"""

from ldm.diffusion.gaussian import DiffusionLoss, GaussianDiffusion
from ldm.diffusion.guidance import classifier_free_guidance, drop_conditioning
from ldm.diffusion.samplers import DDIMSampler, DDPMSampler, sampling_timesteps
from ldm.diffusion.schedules import make_betas

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DiffusionLoss",
    "GaussianDiffusion",
    "classifier_free_guidance",
    "drop_conditioning",
    "make_betas",
    "sampling_timesteps",
]
