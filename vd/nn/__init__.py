"""Our own networks: the two VD denoisers, their composition, and the kl-f8 autoencoder."""

from vd.nn.config import VD_IMAGE_UNET, VD_TEXT_UNET, VD_VAE, UNetConfig, VAEConfig
from vd.nn.unet import UNET_PARTS, Context, UNet, apply_context
from vd.nn.vae import VAE_PARTS, AutoencoderKL, LatentDistribution

__all__ = ["VD_IMAGE_UNET", "VD_TEXT_UNET", "VD_VAE", "UNetConfig", "VAEConfig", "UNET_PARTS", "Context", "UNet",
           "apply_context", "VAE_PARTS", "AutoencoderKL", "LatentDistribution"]
