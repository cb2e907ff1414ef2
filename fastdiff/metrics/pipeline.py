"""What goes into an FID, and how: which reference images (a seeded random subset or all of
them, never "the first n in file order"), at which size they meet the feature network, how
float samples become 8-bit images, and the named protocols behind published numbers.

Why each choice is explicit (the numbers move with each of them):

- Subset. Image folders are sorted by path and `fastdiff sample --per-class` writes its .npz
  ordered by class, so the first n images of a class-sorted set are one class only. A subset
  here is drawn uniformly without replacement by a seeded generator (`choose_subset`).
- Resize. pytorch-fid feeds each stored image straight to the network, which resizes it
  bilinearly to 299×299 (`"direct"`); resizing the reference to the samples' size first
  (`"to-samples"`) adds a second, different interpolation (Parmar et al. 2022, "On Aliased
  Resizing and Surprising Subtleties in GAN Evaluation", show such choices move FID).
- Quantisation. Samples in [-1, 1] become uint8 by rounding (`"round"`, what
  `fastdiff sample` writes) or by truncation (`"floor"`, what the DDPM and guided-diffusion
  sampling scripts do: `((x + 1) * 127.5).clamp(0, 255)` cast to uint8).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

QUANTIZE_MODES = ("round", "floor")
RESIZE_MODES = ("direct", "to-samples")


# --------------------------------------------------------------------------- subsets
def choose_subset(total: int, n: Optional[int], seed: int) -> Tuple[np.ndarray, Dict]:
    """Indices of `n` of `total` images and a record of how they were chosen.

    All of them (in order) when n is None or n >= total; otherwise a uniformly random subset
    without replacement drawn by numpy's PCG64 generator seeded with `seed`, sorted (the
    statistics do not depend on order; sorted indices read files in order)."""
    total = int(total)
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if n is not None and int(n) < 1:
        raise ValueError(f"n must be >= 1 or None (all), got {n}")
    if n is None or int(n) >= total:
        return np.arange(total), {"kind": "all", "n": total, "of": total}
    idx = np.sort(np.random.default_rng(seed).choice(total, int(n), replace=False))
    return idx, {"kind": "random", "n": int(n), "of": total, "seed": int(seed)}


def describe_subset(record: Dict) -> str:
    if record["kind"] == "all":
        return f"all {record['of']}"
    return f"a random {record['n']} of {record['of']} (seed {record['seed']})"


# --------------------------------------------------------------------------- quantisation
def quantize(x: torch.Tensor, mode: str = "round") -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 [0, 255]: "round" to the nearest level, or "floor"
    (truncate, as a cast to uint8 does) the way the DDPM and guided-diffusion samplers save
    their images. Values outside [-1, 1] are clipped first."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize mode must be one of {QUANTIZE_MODES}, got {mode!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"images to quantise must be a floating-point tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    scaled = (x.float().clamp(-1, 1) + 1.0) * 127.5
    return (scaled.round() if mode == "round" else scaled.floor()).to(torch.uint8)


# --------------------------------------------------------------------------- reference images
class ImageFiles:
    """A folder of image files read at their stored size (RGB, as pytorch-fid reads them with
    PIL's convert("RGB")), one file at a time: nothing is resized or cropped here. The file
    list and order are those of `fastdiff.data.load_image_folder` (sorted, recursive)."""

    def __init__(self, path: Path):
        from fastdiff.data import IMAGE_EXTENSIONS, DatasetError
        self.path = Path(path)
        self.files = sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise DatasetError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        self.name = str(path)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> torch.Tensor:
        """(3, H, W) uint8."""
        from PIL import Image

        from fastdiff.data import DatasetError
        f = self.files[int(i)]
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except Exception as e:  # PIL raises several kinds for corrupt files
            raise DatasetError(f"{f}: cannot read image ({type(e).__name__}: {e})") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def image_batches(images, indices: Sequence[int], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches (B, C, H, W) of `images` (an ImageDataset or ImageFiles) at `indices`: uint8,
    or floats in [-1, 1] for a float .npz (`FloatImageDataset`, not quantised here). Files of
    different sizes go in different batches (each is resized on its own later)."""
    if isinstance(images, ImageFiles):
        pending: List[torch.Tensor] = []
        for i in indices:
            img = images.read(i)
            if pending and (img.shape != pending[0].shape or len(pending) == batch_size):
                yield torch.stack(pending)
                pending = []
            pending.append(img)
        if pending:
            yield torch.stack(pending)
        return
    for s in range(0, len(indices), batch_size):
        chunk = torch.as_tensor(np.asarray(indices[s:s + batch_size]), dtype=torch.long)
        x = images.images[chunk]
        if x.dtype != torch.uint8:  # a FloatImageDataset: floats in [0, 1], kept unquantised
            x = x * 2 - 1
        yield x


def load_reference(data: str, split: str, resize: str, sample_size: int, n_builtin: int):
    """The reference set for `--data` (as `fastdiff train` takes it), unresized ("direct":
    stored size; a folder is read file by file) or at the samples' size ("to-samples", via
    `fastdiff.data.load_dataset`). The built-in sets ("shapes", "digits") have no stored
    size: they are made at the samples' size either way; "shapes" draws `n_builtin` images."""
    from fastdiff.data import load_cifar10, load_dataset, load_npz

    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    train = split == "train"
    if resize == "to-samples" or data in ("shapes", "digits"):
        return load_dataset(data, image_size=sample_size, train=train, seed=0,
                            n=n_builtin if data == "shapes" else None)
    path = Path(os.path.expanduser(data))
    if path.is_file() and path.suffix == ".npz":
        return load_npz(path, size=None)
    if (path.is_file() and path.suffix == ".bin") or (path.is_dir() and any(path.glob("*_batch*.bin"))):
        return load_cifar10(path, train, size=None)
    if path.is_dir():
        return ImageFiles(path)
    return load_dataset(data, image_size=sample_size, train=train, seed=0)  # its own error message


# --------------------------------------------------------------------------- protocols
@dataclass(frozen=True)
class Protocol:
    """A fixed evaluation setting: the options it sets (any other value given for them is an
    error) and the reference set it expects."""

    name: str
    settings: Dict[str, object]
    reference_count: int
    image_size: int
    description: str
    notes: List[str] = field(default_factory=list)


PROTOCOLS: Dict[str, Protocol] = {
    "cifar10-50k": Protocol(
        name="cifar10-50k",
        settings=dict(features="inception", n=50_000, n_reference="all", split="train", quantize="floor",
                      reference_resize="direct"),
        reference_count=50_000, image_size=32,
        description="50,000 samples vs the 50,000 CIFAR-10 training images, pool3 features of the FID "
        "Inception-v3 (pytorch-fid's weights), samples truncated to uint8 as the DDPM and guided-diffusion "
        "samplers save them, every image resized straight to 299x299 (pytorch-fid's pipeline)"),
}
