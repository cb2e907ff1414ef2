"""Networks: the DDPM / improved-DDPM U-Net and the latent-diffusion autoencoder."""
from fastdiff.models.autoencoder import AutoencoderKL
from fastdiff.models.unet import PRESETS, UNet, compile, timestep_embedding

__all__ = ["AutoencoderKL", "PRESETS", "UNet", "compile", "timestep_embedding"]
