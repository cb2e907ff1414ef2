"""Datasets, all as uint8 images (N, C, H, W) plus optional integer labels, served scaled
to [-1, 1]:

- "shapes": embedded, generated in code, deterministic by seed (10 labelled shape kinds);
- "digits": scikit-learn's 8x8 digits, upscaled (needs scikit-learn);
- a folder of images (Pillow; resized and center-cropped; labels from first-level subfolders);
- CIFAR-10 binary files (data_batch_*.bin / test_batch.bin: 1 label byte + 3072 bytes);
- a .npz file (keys x/images, optional y/labels; NHWC or NCHW).

Training reads batches by `batch_indices(step)`, a function of (seed, step) only, so a
resumed run sees exactly the data an uninterrupted one would.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fastdiff.errors import InputError

SHAPE_CLASSES = ("circle", "square", "triangle", "plus", "ring", "stripes", "diamond", "x-cross", "frame",
                 "crescent")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CIFAR_RECORD = 1 + 3 * 32 * 32
# Explicit bounds on what a data file may make us allocate (the file's own sizes are checked
# against its header before any array is read): more classes than this, or a decoded array
# or a dataset in memory larger than this many bytes, is refused with a clear error.
MAX_CLASSES = 100_000
MAX_SHAPES_SIZE = 1024
try:
    MAX_DATA_BYTES = int(float(os.environ.get("FASTDIFF_MAX_DATA_GIB", "8")) * 2 ** 30)
except ValueError:  # a malformed setting: the default
    MAX_DATA_BYTES = 8 << 30


class DatasetError(InputError):
    """A dataset that cannot be read; the message names the file."""


class ImageDataset(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) and optional labels; items are (x in [-1, 1], y or -1)."""

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, name: str = "images",
                 class_names: Optional[Sequence[str]] = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels is not None and labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if images.shape[0] == 0:
            raise DatasetError(f"{name}: no images")
        self.images = images.contiguous()
        self.labels = labels.long() if labels is not None else None
        self.name = name
        if labels is not None and class_names is None:
            top = int(labels.max())
            if top >= MAX_CLASSES:
                raise DatasetError(f"{name}: label {top} is too large: at most {MAX_CLASSES} classes "
                                   f"(labels 0..{MAX_CLASSES - 1})")
            class_names = [str(i) for i in range(top + 1)]
        if labels is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
            raise DatasetError(f"{name}: labels must lie in [0, {len(class_names) - 1}], got "
                               f"[{int(labels.min())}, {int(labels.max())}]")
        self.class_names = list(class_names) if class_names is not None else None

    @property
    def num_classes(self) -> Optional[int]:
        return len(self.class_names) if self.class_names is not None else None

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return to_model_range(self.images[i]), (int(self.labels[i]) if self.labels is not None else -1)

    def batch(self, indices) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return to_model_range(self.images[idx]), (self.labels[idx] if self.labels is not None else None)

    def __repr__(self) -> str:
        return f"ImageDataset({self.name}, n={len(self)}, shape={self.shape}, classes={self.num_classes})"


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (rounded, clipped)."""
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


class StepSampler:
    """Which examples a training step reads, as a function of (seed, step) only: epochs of a
    seeded permutation, consumed `global_batch` at a time; rank r of `world` takes its slice."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self._perm_epoch = -1
        self._perm: Optional[np.ndarray] = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, 0x5EED, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def position(self, step: int) -> int:
        """Index of the first example (in the endless epoch stream) read by `step`."""
        return step * self.batch_size * self.world

    def indices(self, step: int) -> np.ndarray:
        start = self.position(step) + self.rank * self.batch_size
        out = np.empty(self.batch_size, dtype=np.int64)
        for k in range(self.batch_size):
            p = start + k
            out[k] = self._permutation(p // self.n)[p % self.n]
        return out


# --------------------------------------------------------------------------- shapes
_PALETTE = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [255, 255, 255],
], dtype=np.float64)


def _shape_mask(kind: int, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float,
                angle: float) -> np.ndarray:
    """Boolean mask of one shape on the (super-sampled) pixel grid; r is the half-size."""
    dx, dy = xx - cx, yy - cy
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy  # rotated coordinates
    dist = np.hypot(dx, dy)
    name = SHAPE_CLASSES[kind]
    if name == "circle":
        return dist <= r
    if name == "square":
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if name == "triangle":  # upright equilateral, centroid at (cx, cy)
        h = 1.5 * r
        top = cy - r
        rel = (yy - top) / h  # 0 at apex, 1 at base
        return (rel >= 0) & (rel <= 1) & (np.abs(dx) <= rel * h / np.sqrt(3))
    if name == "plus":
        w = r * 0.33
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if name == "ring":
        return (dist <= r) & (dist >= r * 0.55)
    if name == "stripes":  # a square patch of three bars
        inside = (np.abs(u) <= r * 0.9) & (np.abs(v) <= r * 0.9)
        return inside & (np.floor((v + r * 0.9) / (r * 1.8 / 5)).astype(np.int64) % 2 == 0)
    if name == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if name == "x-cross":
        w = r * 0.3
        p, q = (dx + dy) / np.sqrt(2), (dx - dy) / np.sqrt(2)
        return ((np.abs(p) <= w) & (np.abs(q) <= r)) | ((np.abs(q) <= w) & (np.abs(p) <= r))
    if name == "frame":
        a = np.maximum(np.abs(u), np.abs(v))
        return (a <= r * 0.85) & (a >= r * 0.5)
    # crescent: a disc minus a shifted disc
    return (dist <= r) & (np.hypot(dx - r * 0.55 * np.cos(angle), dy - r * 0.55 * np.sin(angle)) > r * 0.8)


def make_shapes(n: int, seed: int = 0, size: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """n RGB images (n, 3, size, size) uint8 and their labels (shape kind). Image i depends on
    (seed, i) only. Each: one shape of a random colour, position, size (and rotation where it
    shows), anti-aliased, on a plain or gradient background of a contrasting darkness."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 10 <= size <= MAX_SHAPES_SIZE:
        raise ValueError(f"size must be an integer >= 10 (the largest shape and its 1-pixel margin must fit) and "
                         f"<= {MAX_SHAPES_SIZE} (drawing is super-sampled 4x), got {size!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    ss = 4  # super-sampling factor for anti-aliasing
    grid = (np.arange(size * ss) + 0.5) / ss
    xx, yy = np.meshgrid(grid, grid)
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        kind = int(rng.integers(len(SHAPE_CLASSES)))
        r = rng.uniform(0.24, 0.4) * size
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        angle = rng.uniform(0, np.pi / 2) if SHAPE_CLASSES[kind] in ("square", "stripes", "frame") else \
            (rng.uniform(0, 2 * np.pi) if SHAPE_CLASSES[kind] == "crescent" else 0.0)
        colour = _PALETTE[rng.integers(len(_PALETTE))] * rng.uniform(0.8, 1.0)
        dark_bg = rng.random() < 0.7
        base = rng.uniform(0, 50, size=3) if dark_bg else rng.uniform(170, 230, size=3)
        if not dark_bg:
            colour = colour * 0.45  # a dark shape on a light background
        if rng.random() < 0.5:  # gradient background along a random direction
            other = np.clip(base + rng.uniform(-40, 40, size=3) + (35 if dark_bg else -35), 0, 255)
            theta = rng.uniform(0, 2 * np.pi)
            ramp = ((np.cos(theta) * (xx - size / 2) + np.sin(theta) * (yy - size / 2)) / size + 0.5).clip(0, 1)
            bg = base[:, None, None] * (1 - ramp) + other[:, None, None] * ramp
        else:
            bg = np.broadcast_to(base[:, None, None], (3, size * ss, size * ss))
        mask = _shape_mask(kind, xx, yy, cx, cy, r, angle).astype(np.float64)
        img = bg * (1 - mask) + colour[:, None, None] * mask
        img = img.reshape(3, size, ss, size, ss).mean(axis=(2, 4))
        images[i] = np.clip(np.round(img), 0, 255).astype(np.uint8)
        labels[i] = kind
    return images, labels


def shapes_dataset(n: int = 10000, seed: int = 0, size: int = 32, train: bool = True) -> ImageDataset:
    """The embedded dataset; the held-out split uses a different stream of the same seed."""
    images, labels = make_shapes(n, seed=seed if train else seed + 1_000_003, size=size)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), name="shapes",
                        class_names=SHAPE_CLASSES)


# --------------------------------------------------------------------------- files
def _resize_batch(images: torch.Tensor, size: Optional[int], name: str) -> torch.Tensor:
    """Square uint8 batch -> size x size (center crop to square first)."""
    if size is None:
        return images
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    chunk = max(1, (64 << 20) // (4 * c * s * s))  # float copies of at most ~64 MB at a time
    for i in range(0, n, chunk):
        x = images[i:i + chunk, :, top:top + s, left:left + s].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=s > size, align_corners=False)
        out[i:i + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


def load_image_folder(path: Path, size: int = 32, channels: int = 3) -> ImageDataset:
    from PIL import Image, ImageOps

    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DatasetError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    rel_parents = [p.relative_to(path).parts for p in files]
    labelled = all(len(parts) >= 2 for parts in rel_parents)
    class_names = sorted({parts[0] for parts in rel_parents}) if labelled else None
    mode = "RGB" if channels == 3 else "L"
    images = np.empty((len(files), channels, size, size), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = ImageOps.fit(im.convert(mode), (size, size), method=Image.BICUBIC)
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # PIL raises several kinds for corrupt files
            raise DatasetError(f"{f}: cannot read image ({type(e).__name__}: {e})") from None
        images[i] = arr.reshape(size, size, channels).transpose(2, 0, 1)
    labels = None
    if class_names is not None:
        index = {c: k for k, c in enumerate(class_names)}
        labels = torch.tensor([index[parts[0]] for parts in rel_parents])
    return ImageDataset(torch.from_numpy(images), labels, name=str(path), class_names=class_names)


def _read_cifar_file(f: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        raw = np.fromfile(f, dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"{f}: cannot read CIFAR-10 file ({e})") from None
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise DatasetError(f"{f}: not a CIFAR-10 binary file: {raw.size} bytes is not a multiple of "
                           f"{CIFAR_RECORD} (1 label byte + 3072 image bytes per record)")
    records = raw.reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DatasetError(f"{f}: not a CIFAR-10 binary file: label byte {labels.max()} > 9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_cifar10(path: Path, train: bool = True, size: int = 32) -> ImageDataset:
    if path.is_file():
        files = [path]
    else:
        files = sorted(path.glob("data_batch_*.bin")) if train else [path / "test_batch.bin"]
        files = [f for f in files if f.exists()] or sorted(path.glob("*_batch*.bin"))
    if not files:
        raise DatasetError(f"{path}: no CIFAR-10 files (data_batch_*.bin / test_batch.bin)")
    parts = [_read_cifar_file(f) for f in files]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageDataset(_resize_batch(images, size, str(path)), labels, name=str(path), class_names=CIFAR_CLASSES)


def _check_npz_sizes(path: Path) -> None:
    """Read each member's .npy header (shape, dtype) without its data, and refuse what would
    decode to more than MAX_DATA_BYTES or does not match the member's stored size: a small
    compressed file cannot make us allocate without bound."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                                   np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)
                    header = f.tell() if f.seekable() else None
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if nbytes > MAX_DATA_BYTES:
                    raise DatasetError(f"{path}: array {info.filename[:-4]!r} of shape {shape} would take "
                                       f"{nbytes / 2**30:.1f} GiB (at most {MAX_DATA_BYTES / 2**30:.0f} GiB)")
                if info.file_size < nbytes or (header is not None and info.file_size != header + nbytes):
                    raise DatasetError(f"{path}: array {info.filename[:-4]!r} claims shape {shape} ({nbytes} "
                                       f"bytes) but its member holds {info.file_size} bytes")
    except DatasetError:
        raise
    except zipfile.BadZipFile as e:
        raise DatasetError(f"{path}: not an .npz file ({e})") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read .npz file ({type(e).__name__}: {e})") from None


def load_npz(path: Path, size: Optional[int] = 32) -> ImageDataset:
    _check_npz_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            xkey = next((k for k in ("x", "images") if k in keys), None)
            if xkey is None:
                raise DatasetError(f"{path}: no 'x' or 'images' array (found keys {sorted(keys)})")
            x = z[xkey]
            ykey = next((k for k in ("y", "labels") if k in keys), None)
            y = z[ykey] if ykey is not None else None
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{path}: cannot read .npz file ({type(e).__name__}: {e})") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DatasetError(f"{path}: '{xkey}' must be (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] not in (1, 3):
        raise DatasetError(f"{path}: '{xkey}' must have 1 or 3 channels, got shape {x.shape}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise DatasetError(f"{path}: '{xkey}' must be uint8 or floating point, got {x.dtype}")
        # floats: [0, 1] when non-negative, else [-1, 1]; NaN stays NaN (counted by training)
        lo = np.nanmin(x) if np.isfinite(x).any() else 0.0
        xf = (x.astype(np.float32) + (1.0 if lo < 0 else 0.0)) / (2.0 if lo < 0 else 1.0)
        images = torch.from_numpy(np.ascontiguousarray(xf))
        if size is not None and images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        labels = _npz_labels(path, y, images.shape[0])
        return FloatImageDataset(images, labels, name=str(path))
    images = _resize_batch(torch.from_numpy(np.ascontiguousarray(x)), size, str(path))
    return ImageDataset(images, _npz_labels(path, y, images.shape[0]), name=str(path))


def _npz_labels(path, y, n) -> Optional[torch.Tensor]:
    if y is None:
        return None
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise DatasetError(f"{path}: labels must be {n} non-negative integers, got {y.dtype} {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


class FloatImageDataset(ImageDataset):
    """Images already in [0, 1] floats (from a float .npz); no uint8 rounding."""

    def __init__(self, images01: torch.Tensor, labels=None, name="images"):
        super().__init__(torch.zeros(images01.shape, dtype=torch.uint8), labels, name=name)
        self.images = images01.float().contiguous()

    def __getitem__(self, i):
        return self.images[i] * 2 - 1, (int(self.labels[i]) if self.labels is not None else -1)

    def batch(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx] * 2 - 1, (self.labels[idx] if self.labels is not None else None)


def load_digits(size: int = 32) -> ImageDataset:
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError:
        raise DatasetError("dataset 'digits' needs scikit-learn (pip install scikit-learn)") from None
    d = _sk_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8)
    return ImageDataset(images, torch.from_numpy(d.target.astype(np.int64)), name="digits",
                        class_names=[str(i) for i in range(10)])


def load_dataset(name_or_path: str, image_size: int = 32, train: bool = True, seed: int = 0,
                 n: Optional[int] = None) -> ImageDataset:
    """A dataset by name ("shapes", "digits") or path (folder of images, CIFAR-10 folder or
    .bin file, .npz file). `n` sets the size of "shapes" (default 10000)."""
    if name_or_path == "shapes":
        n = n or 10000
        if n * 3 * image_size * image_size > MAX_DATA_BYTES:
            raise DatasetError(f"shapes: {n} images of {image_size}x{image_size} would take "
                               f"{n * 3 * image_size ** 2 / 2**30:.1f} GiB (at most {MAX_DATA_BYTES / 2**30:.0f} "
                               f"GiB): lower the dataset size or the image size")
        return shapes_dataset(n=n, seed=seed, size=image_size, train=train)
    if name_or_path == "digits":
        return load_digits(image_size)
    path = Path(os.path.expanduser(name_or_path))
    if not path.exists():
        raise DatasetError(f"{name_or_path}: no such file or folder (and not a built-in dataset: "
                           "'shapes', 'digits')")
    if path.is_file():
        if path.suffix == ".npz":
            return load_npz(path, image_size)
        if path.suffix == ".bin":
            return load_cifar10(path, train, image_size)
        raise DatasetError(f"{path}: unsupported file type (expected .npz, a CIFAR-10 .bin, or a folder)")
    if any(path.glob("*_batch*.bin")):
        return load_cifar10(path, train, image_size)
    return load_image_folder(path, image_size)
