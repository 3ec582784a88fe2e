"""Plain nn.Modules: the KL autoencoder and the cross-attention UNet."""

from ldm.models.autoencoder import AutoencoderOutput, DiagonalGaussian, KLAutoencoder
from ldm.models.unet import CrossAttentionUNet

__all__ = ["AutoencoderOutput", "CrossAttentionUNet", "DiagonalGaussian", "KLAutoencoder"]
