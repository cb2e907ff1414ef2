"""Training on latents: `fastdiff train --autoencoder DIR` (latent diffusion, Rombach et al. 2022).

The diffusion model learns the law of z = scaling_factor * (z_enc - shift_factor), z_enc a
**sample** of the autoencoder's posterior q(z | x) for each training image, as LDM trains (its
first-stage encoding samples the diagonal Gaussian): the decoder was trained on posterior samples,
so that is the latent law it knows how to decode; for a KL-regularised autoencoder (weight ~1e-6)
the posterior std is small and a sample stays close to the mean.

The posterior of every training image is **encoded once** at the start of the run (cached: its
mean and std, in memory) and each step draws a fresh sample z = mean + std * eps from the step's
own generator, so resuming stays bitwise exact. On-the-fly encoding would run the encoder on
every batch of every step for the same law. Measured on this project's shared 2-core CPU (one torch
thread, other jobs running; 32x32 shapes, an f = 4 autoencoder of widths 32,64,64 with 4 latent
channels, batch 32, the "demo" U-Net class-conditional on the 4x8x8 latents): encoding a batch
took 121 ms against 305 ms for the U-Net's training step, so on the fly would cost about 40 % more
per step, while the cache of 10,000 images took 56 s once (about 180 steps' worth) and holds
20.5 MB: caching wins for any run longer than a few hundred steps.

The run folder keeps its own copy of the autoencoder (`autoencoder/`: config.json and weights,
copied byte for byte), so a run stands alone: `fastdiff sample RUN`, `export`, `eval` and
`--resume` read that copy, never the folder the run was started from.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional, Tuple

import torch

from fastdiff.data import ImageDataset
from fastdiff.errors import InputError, UserError
from fastdiff.io import atomic_write_folder
from fastdiff.models.autoencoder import AutoencoderKL
from fastdiff.models.latent import (AUTOENCODER_CONFIG, LatentDiffusionModel, autoencoder_weights_file,
                                    load_autoencoder_folder)

#: the run's copy of its autoencoder, a subfolder of the run folder
AUTOENCODER_DIR = "autoencoder"
#: images per encoder call when the training set is encoded
ENCODE_BATCH = 64
#: the cached posteriors (mean and std, float32) of a training set may take at most this much memory
MAX_CACHE_BYTES = 8 << 30


def install_autoencoder(source, out: Path) -> Path:
    """Copy the autoencoder folder `source` (its config.json and weights file) into out/autoencoder,
    replacing an older copy; the copy appears whole or not at all."""
    source = Path(source).expanduser()
    weights = autoencoder_weights_file(source)
    if weights is None:  # load_autoencoder_folder has already said so; keep the guard for direct calls
        raise FileNotFoundError(f"{source}: the autoencoder folder has no weights")
    files = {AUTOENCODER_CONFIG: (source / AUTOENCODER_CONFIG).read_bytes(), weights.name: weights.read_bytes()}
    target = Path(out) / AUTOENCODER_DIR
    if target.exists():  # --overwrite of a latent run: the new run's autoencoder replaces the old one
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_folder(target, files)


def run_autoencoder(out, device="cpu") -> AutoencoderKL:
    """The autoencoder copy of a latent run's folder."""
    folder = Path(out) / AUTOENCODER_DIR
    if not folder.is_dir():
        raise InputError(f"{Path(out)}: the run was trained on latents (--autoencoder) but its copy of the "
                         f"autoencoder, {folder}, is missing")
    return load_autoencoder_folder(folder, device=device)


def run_latent_model(out, unet: torch.nn.Module) -> LatentDiffusionModel:
    """A latent run's U-Net joined with the run's autoencoder (checked: the latent shapes must fit)."""
    autoencoder = run_autoencoder(out, device=next(unet.parameters()).device)
    try:
        return LatentDiffusionModel(unet, autoencoder)
    except ValueError as e:
        raise InputError(f"{Path(out) / AUTOENCODER_DIR}: {e}") from None


def check_latent_data(autoencoder: AutoencoderKL, dataset: ImageDataset, image_size: int) -> Tuple[int, int, int]:
    """The latent shape (latent_channels, image_size / f, image_size / f) of the training images,
    or a UserError naming the mismatch."""
    f = autoencoder.downsampling_factor
    if image_size % f:
        raise UserError(f"--image-size {image_size} must be divisible by the autoencoder's downsampling factor f={f} "
                        f"(the U-Net runs on image_size / f latents)")
    if dataset.shape[0] != autoencoder.in_channels:
        raise UserError(f"{dataset.name}: {dataset.shape[0]}-channel images, but the autoencoder encodes "
                        f"{autoencoder.in_channels}-channel images")
    return autoencoder.latent_channels, image_size // f, image_size // f


class LatentData:
    """The training set as cached posteriors: `batch(indices, generator)` -> (scaled latent samples,
    labels), like ImageDataset.batch for images."""

    def __init__(self, dataset: ImageDataset, autoencoder: AutoencoderKL, scaling_factor: float,
                 shift_factor: float = 0.0, device="cpu"):
        self.dataset, self.scaling_factor, self.shift_factor = dataset, float(scaling_factor), float(shift_factor)
        shape = (autoencoder.latent_channels, dataset.shape[1] // autoencoder.downsampling_factor,
                 dataset.shape[2] // autoencoder.downsampling_factor)
        need = 2 * 4 * len(dataset) * shape[0] * shape[1] * shape[2]
        if need > MAX_CACHE_BYTES:
            raise UserError(f"{dataset.name}: the cached latents of {len(dataset)} images would take "
                            f"{need / 2**30:.1f} GiB (at most {MAX_CACHE_BYTES / 2**30:.0f} GiB); use a smaller set")
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, len(dataset), ENCODE_BATCH):
                x, _ = dataset.batch(range(start, min(len(dataset), start + ENCODE_BATCH)))
                posterior = autoencoder.encode(x.to(device))
                means.append(posterior.mean.float().cpu())
                stds.append(posterior.std.float().cpu())
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.std).all()):
            raise InputError("the autoencoder gives non-finite latents for the training images (damaged weights?)")
        self.shape = tuple(self.mean.shape[1:])
        self.num_classes = dataset.num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices, generator: Optional[torch.Generator] = None, rank: int = 0, world: int = 1):
        """(scaling_factor * (mean + std * eps - shift_factor), labels) of the images `indices`, eps
        from `generator` (None: the posterior mean). Under DDP, eps is drawn for the global batch
        (world x this rank's) and sliced, as the loop draws t and the noise: W ranks see what one
        process of the global batch sees."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        z = self.mean[idx]
        if generator is not None:
            n = len(idx)
            eps = torch.randn((n * world, *z.shape[1:]), generator=generator, dtype=z.dtype)[rank * n:(rank + 1) * n]
            z = z + self.std[idx] * eps
        labels = self.dataset.labels[idx] if self.dataset.labels is not None else None
        return self.scaling_factor * (z - self.shift_factor), labels


def prepare_latents(config, dataset: ImageDataset, out: Path, resumed: bool, rank: int, device, log=print):
    """(autoencoder, LatentData) of a `--autoencoder` run, or (None, None) for a pixel run. A new run
    reads config.autoencoder and copies it into the run folder (rank 0); a resumed run reads its copy."""
    if config.autoencoder is None:
        return None, None
    autoencoder = run_autoencoder(out, device=device) if resumed else \
        load_autoencoder_folder(config.autoencoder, device=device)
    check_latent_data(autoencoder, dataset, config.image_size)
    if not resumed and rank == 0:
        install_autoencoder(config.autoencoder, out)
    shift = autoencoder.shift_factor or 0.0
    t0 = time.time()
    latents = LatentData(dataset, autoencoder, autoencoder.scaling_factor, shift, device=device)
    log(f"encoded {len(dataset)} training images into {'x'.join(map(str, latents.shape))} latents "
        f"(f={autoencoder.downsampling_factor}, scaling_factor={autoencoder.scaling_factor:.5g}) in "
        f"{time.time() - t0:.1f}s")
    return autoencoder, latents
