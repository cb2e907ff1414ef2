"""Networks: the DDPM / improved-DDPM U-Net, the latent-diffusion autoencoder, and the latent
diffusion model that joins them."""
from fastdiff.models.autoencoder import AutoencoderKL
from fastdiff.models.latent import LatentDiffusionModel
from fastdiff.models.unet import PRESETS, UNet, compile, timestep_embedding

__all__ = ["AutoencoderKL", "LatentDiffusionModel", "PRESETS", "UNet", "compile", "timestep_embedding"]
