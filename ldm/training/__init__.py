from ldm.training.autoencoder_module import AutoencoderModule
from ldm.training.diffusion_module import DiffusionModule

__all__ = ["AutoencoderModule", "DiffusionModule"]
