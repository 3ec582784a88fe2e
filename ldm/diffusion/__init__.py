"""Diffusion math: noise schedules, the Gaussian forward process and its parameterizations, rectified flow,
samplers, guidance.

Pure tensor code (torch, math, einops): the network is a callable and the conditioning is opaque.
"""

from ldm.diffusion.flow import RectifiedFlow, flow_sigmas
from ldm.diffusion.gaussian import DiffusionLoss, GaussianDiffusion
from ldm.diffusion.guidance import (
    autoguidance,
    classifier_free_guidance,
    drop_conditioning,
    rescale_guidance,
)
from ldm.diffusion.init_image import InitImage
from ldm.diffusion.k_samplers import (
    DPMSolverPP2MSampler,
    EulerAncestralSampler,
    EulerSampler,
    HeunSampler,
    karras_sigmas,
)
from ldm.diffusion.samplers import DDIMSampler, DDPMSampler, sampling_timesteps
from ldm.diffusion.schedules import make_betas, rescale_zero_terminal_snr

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPP2MSampler",
    "DiffusionLoss",
    "EulerAncestralSampler",
    "EulerSampler",
    "GaussianDiffusion",
    "HeunSampler",
    "InitImage",
    "RectifiedFlow",
    "autoguidance",
    "classifier_free_guidance",
    "drop_conditioning",
    "flow_sigmas",
    "karras_sigmas",
    "make_betas",
    "rescale_guidance",
    "rescale_zero_terminal_snr",
    "sampling_timesteps",
]
