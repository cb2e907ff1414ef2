"""Networks: the DDPM / improved-DDPM U-Net."""
from fastdiff.models.unet import PRESETS, UNet, compile, timestep_embedding

__all__ = ["PRESETS", "UNet", "compile", "timestep_embedding"]
