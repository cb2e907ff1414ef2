"""Latent diffusion (Rombach et al. 2022, §3 and §4.3.2): a diffusion model that runs in the
latent space of a frozen autoencoder, as one network.

`LatentDiffusionModel(unet, autoencoder)` is called like its U-Net, on latents
z = scaling_factor * (E(x) - shift_factor), and carries what `fastdiff.sample` reads from a model
(`diffusion`, `sample_shape` = the latent shape, `num_classes`, `default_guidance_scale`, ...), so
every sampler, classifier-free and classifier guidance (with a classifier of latents) run on it
unchanged. At the end `fastdiff.sample` hands the latents to `decode_latents` (the one hook in
fastdiff/sampling/loop.py: a model with `decode_latents` returns images): decoded in batches, in
the precision of the autoencoder's weights (`model.double()`, `model.bfloat16()` convert both
networks; `fastdiff.optimize(model, precision="bf16")` decodes under the same bf16 autocast).

Sampling does not clip latents: `default_clip_denoised` is False, since latents are not data in
[-1, 1] (LDM's samplers do not clip them either); clip_denoised=True may still be asked for.

The autoencoder may be a `fastdiff.models.AutoencoderKL` or any module with the same protocol:
`encode(x)` -> a posterior with `.mean`, `.std` and `.sample(generator)`, `decode(z)` -> images,
and the attributes `in_channels`, `latent_channels`, `downsampling_factor` (f) and, optionally,
`scaling_factor` and `shift_factor`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from fastdiff.errors import InputError
from fastdiff.io import load_state_dict_strict
from fastdiff.models.autoencoder import AutoencoderKL

#: the files of an autoencoder folder (diffusers' AutoencoderKL.save_pretrained layout, which
#: `fastdiff train-autoencoder` and fastdiff.interop.export_autoencoder write)
AUTOENCODER_CONFIG = "config.json"
AUTOENCODER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
#: latents decoded per decoder call: bounds the decoder's activation memory, whatever the batch
DECODE_BATCH_SIZE = 64


def _scale(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not math.isfinite(v) or (name == "scaling_factor" and v <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if name == 'scaling_factor' else ''}, "
                         f"got {value!r}")
    return v


def check_latent_shapes(unet: nn.Module, autoencoder: nn.Module) -> None:
    """ValueError unless the U-Net runs on the autoencoder's latents: its input channels are the
    latent channels, and its outputs are those channels (twice for a learned variance)."""
    for name in ("in_channels", "latent_channels", "downsampling_factor", "encode", "decode"):
        if not hasattr(autoencoder, name):
            raise TypeError(f"autoencoder must be a fastdiff.models.AutoencoderKL or have its protocol "
                            f"(encode, decode, in_channels, latent_channels, downsampling_factor); "
                            f"{type(autoencoder).__name__} has no {name!r}")
    shape = getattr(unet, "sample_shape", None)
    if shape is None or len(shape) != 3 or getattr(unet, "diffusion", None) is None:
        raise TypeError(f"unet must be a diffusion network that carries `sample_shape` (C, H, W) and `diffusion` "
                        f"(a fastdiff.UNet), got {type(unet).__name__}")
    latent = int(autoencoder.latent_channels)
    if shape[0] != latent:
        raise ValueError(f"latent shape mismatch: the U-Net takes {shape[0]}-channel inputs {tuple(shape)}, but the "
                         f"autoencoder's latents have latent_channels={latent}: build the U-Net with "
                         f"in_channels={latent}")
    out = getattr(unet, "out_channels", None)
    if out is not None and out not in (latent, 2 * latent):
        raise ValueError(f"latent shape mismatch: the U-Net returns {out} channels; a model of "
                         f"{latent}-channel latents returns {latent} (or {2 * latent} with a learned variance)")


class LatentDiffusionModel(nn.Module):
    """U-Net + frozen autoencoder + latent scaling: a latent diffusion model that `fastdiff.sample`
    treats like a pixel model and that returns images (see the module docstring).

    unet: the diffusion network of latents (a fastdiff.UNet with in_channels = the autoencoder's
        latent_channels and image_size = the latent size, i.e. the image size / f).
    autoencoder: a fastdiff.models.AutoencoderKL (or the same protocol); its weights are not trained.
    scaling_factor, shift_factor: z = scaling_factor * (E(x) - shift_factor) (LDM §4.3.2: unit-variance
        latents); default: the autoencoder's own (`scaling_factor`, `shift_factor` of its config).
    decode_batch_size: latents per decoder call.
    """

    def __init__(self, unet: nn.Module, autoencoder: nn.Module, scaling_factor: Optional[float] = None,
                 shift_factor: Optional[float] = None, decode_batch_size: int = DECODE_BATCH_SIZE):
        super().__init__()
        check_latent_shapes(unet, autoencoder)
        if scaling_factor is None:
            scaling_factor = getattr(autoencoder, "scaling_factor", None)
            if scaling_factor is None:
                raise ValueError("scaling_factor is required: the autoencoder carries none")
        if shift_factor is None:
            shift_factor = getattr(autoencoder, "shift_factor", None) or 0.0
        if isinstance(decode_batch_size, bool) or not isinstance(decode_batch_size, int) or decode_batch_size < 1:
            raise ValueError(f"decode_batch_size must be a positive int, got {decode_batch_size!r}")
        self.unet = unet
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.scaling_factor = _scale("scaling_factor", scaling_factor)
        self.shift_factor = _scale("shift_factor", shift_factor)
        self.decode_batch_size = decode_batch_size
        self.default_guidance_scale = float(getattr(unet, "default_guidance_scale", 0.0))
        self.default_clip_denoised = False  # latents are not data in [-1, 1]

    # -- what fastdiff.sample reads from a model: the U-Net's, in latent space -----------------
    @property
    def diffusion(self):
        return self.unet.diffusion

    @diffusion.setter
    def diffusion(self, value) -> None:
        self.unet.diffusion = value

    @property
    def sample_shape(self) -> Tuple[int, int, int]:
        """The shape the sampler works in: the latents' (latent_channels, H / f, W / f)."""
        return tuple(self.unet.sample_shape)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """The decoded images' shape (channels, H, W)."""
        c, h, w = self.sample_shape
        f = int(self.autoencoder.downsampling_factor)
        config = getattr(self.autoencoder, "config", None)  # an AutoencoderKL's decoder may change the channels
        channels = config.get("out_channels") if isinstance(config, dict) else None
        return int(channels or self.autoencoder.in_channels), h * f, w * f

    @property
    def num_classes(self) -> Optional[int]:
        return getattr(self.unet, "num_classes", None)

    @property
    def downsampling_factor(self) -> int:
        return int(self.autoencoder.downsampling_factor)

    def __getattr__(self, name: str):
        # anything else a sampler or command reads (default_spacing, out_channels, config, ...)
        # is the U-Net's
        try:
            return super().__getattr__(name)
        except AttributeError:
            unet = self.__dict__.get("_modules", {}).get("unet")
            if unet is None:  # not built yet (copy, unpickling)
                raise
            return getattr(unet, name)

    def forward(self, z: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        """The U-Net's prediction for latents z_t (eps, x0 or v of the latents)."""
        return self.unet(z, t, **kwargs)

    # -- pixels <-> latents ----------------------------------------------------------------
    def check_images(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        """x as images this model's autoencoder encodes to the U-Net's latent size, else ValueError."""
        _, h, w = self.image_shape
        c = self.autoencoder.in_channels
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"latent shape mismatch: {name} must be images (B, {c}, {h}, "
                             f"{w}) (the U-Net's {self.sample_shape[1]}x{self.sample_shape[2]} latents times the "
                             f"autoencoder's f={self.downsampling_factor}), got {got}")
        return x

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, sample: bool = False,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scaled latents scaling_factor * (z - shift_factor) of images x in [-1, 1]: the posterior
        mean, or a posterior sample (sample=True, noise from `generator`)."""
        self.check_images(x)
        posterior = self.autoencoder.encode(x.to(self._ae_dtype()))
        z = posterior.sample(generator) if sample else posterior.mean
        return (self.scaling_factor * (z - self.shift_factor)).to(x.dtype)

    def _ae_dtype(self) -> torch.dtype:
        for p in (*self.autoencoder.parameters(), *self.autoencoder.buffers()):
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
        """Images D(z / scaling_factor + shift_factor) of sampled latents, `batch_size` (default:
        decode_batch_size) at a time, in the autoencoder's dtype; returned in z's dtype. The
        decoder's output is not clipped (PNG and uint8 writers clip to [-1, 1])."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or tuple(z.shape[1:]) != self.sample_shape:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"latent shape mismatch: z must be latents (B, {', '.join(map(str, self.sample_shape))}), "
                             f"got {got}")
        size = batch_size or self.decode_batch_size
        dtype = self._ae_dtype()
        parts = [self.autoencoder.decode(chunk.to(dtype) / self.scaling_factor + self.shift_factor)
                 for chunk in z.split(size)]
        return torch.cat(parts).to(z.dtype)

    def extra_repr(self) -> str:
        return (f"latents {self.sample_shape} -> images {self.image_shape}, f={self.downsampling_factor}, "
                f"scaling_factor={self.scaling_factor:.6g}, shift_factor={self.shift_factor:g}")


# --------------------------------------------------------------------------- autoencoder folders
def autoencoder_weights_file(folder: Path) -> Optional[Path]:
    for name in AUTOENCODER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    return None


def read_autoencoder_config(folder) -> dict:
    """The config.json of an autoencoder folder, checked: a missing folder or file, or another
    model class, is one clear error naming the path."""
    folder = Path(os.path.expanduser(str(folder)))
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such autoencoder folder (a diffusers AutoencoderKL folder: "
                                f"{AUTOENCODER_CONFIG} + {AUTOENCODER_WEIGHTS[0]}, as `fastdiff train-autoencoder` "
                                f"writes)")
    path = folder / AUTOENCODER_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: not an autoencoder folder: it has no {AUTOENCODER_CONFIG}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderKL":
        what = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise InputError(f"{path}: not an autoencoder (_class_name {what!r}; expected 'AutoencoderKL')")
    return config


def load_autoencoder_folder(folder, device="cpu") -> AutoencoderKL:
    """A frozen AutoencoderKL (eval mode, float32) from a folder of diffusers' layout, read with the
    checks of fastdiff.io.load_state_dict_strict. (fastdiff.load_model reads such a folder too, with
    diffusers' pre-0.14 attention names; this reader sits below the training layer, which needs it.)"""
    folder = Path(os.path.expanduser(str(folder)))
    config = read_autoencoder_config(folder)
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        model = AutoencoderKL(**fields)
    except (TypeError, ValueError) as e:
        raise InputError(f"{folder / AUTOENCODER_CONFIG}: {e}") from None
    weights = autoencoder_weights_file(folder)
    if weights is None:
        raise FileNotFoundError(f"{folder}: the autoencoder folder has no weights ({' or '.join(AUTOENCODER_WEIGHTS)})")
    try:
        load_state_dict_strict(model, weights, "AutoencoderKL")
    except ValueError as e:
        raise InputError(f"{e} (a folder of an older diffusers: load it with fastdiff.load_model and save it "
                         f"again with fastdiff.interop.export_autoencoder)") from None
    return model.to(device).requires_grad_(False).eval()
