"""Feature extractors for the sample-quality metrics: the FID Inception-v3 (weights supplied by
the user, never downloaded) and a small CNN trained on the embedded "shapes" data."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff.io import load_state_dict_strict
from fastdiff.metrics.fid import FeatureStats

# --------------------------------------------------------------------------- feature extractors
class FeatureExtractor:
    """images in [-1, 1] (N, C, H, W), C = 1 or 3 -> features (N, dim) float32 on the CPU.

    Subclasses set `name`, `dim` and `net` (an nn.Module mapping the prepared batch to
    features) and may override `prepare`. Calls run in eval mode without autograd, in chunks
    of `batch_size`."""

    name: str = "features"
    dim: int = 0
    batch_size: int = 64
    net: nn.Module

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"{self.name}: images must be a floating-point tensor in [-1, 1], got "
                            f"{getattr(images, 'dtype', type(images).__name__)}")
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return images

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = self._check(images)
        device = next(self.net.parameters()).device
        self.net.eval()
        out = [self.net(self.prepare(images[s:s + self.batch_size].to(device, torch.float32))).float().cpu()
               for s in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def to(self, device) -> "FeatureExtractor":
        self.net.to(device)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


def compute_stats(extractor: Callable, batches: Iterable[torch.Tensor], dim: Optional[int] = None,
                  keep_features: bool = False) -> Tuple[FeatureStats, Optional[np.ndarray]]:
    """Stream image batches through an extractor into FeatureStats (and, if asked, keep the
    features for KID / precision-recall)."""
    stats = FeatureStats(dim or extractor.dim, name=getattr(extractor, "name", ""))
    kept = []
    for x in batches:
        f = extractor(x)
        stats.update(f)
        if keep_features:
            kept.append(f.double().numpy())
    return stats, (np.concatenate(kept) if keep_features and kept else None)


# ----- Inception-v3, FID variant
class _BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)  # TF's BN epsilon

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    # the TF graph's average pool ignores the zero padding (count_include_pad=False)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = _BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = _BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class _InceptionB(nn.Module):  # grid reduction 35 -> 17
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = _BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class _InceptionC(nn.Module):  # factorised 7x7
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = _BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b7, bd, bp], 1)


class _InceptionD(nn.Module):  # grid reduction 17 -> 8
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = _BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = _BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = _BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class _InceptionE(nn.Module):  # expanded filter bank; `pool` is "avg" (Mixed_7b) or "max" (Mixed_7c)
    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = _BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":  # the FID graph's last block max-pools here
            bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            bp = _avg_pool_3x3(x)
        return torch.cat([b1, b3, bd, self.branch_pool(bp)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the TF graph behind the FID weights (2015-12-05): average pools that
    exclude padding, a max pool in the last block, BN eps 1e-3, no auxiliary head and a
    1008-way classifier (kept only so that the weights file loads strictly). Parameter names
    follow the layout of that file. forward: (N, 3, 299, 299) in [-1, 1] -> (N, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = _InceptionA(192, pool_features=32)
        self.Mixed_5c = _InceptionA(256, pool_features=64)
        self.Mixed_5d = _InceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, channels_7x7=128)
        self.Mixed_6c = _InceptionC(768, channels_7x7=160)
        self.Mixed_6d = _InceptionC(768, channels_7x7=160)
        self.Mixed_6e = _InceptionC(768, channels_7x7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, pool="avg")
        self.Mixed_7c = _InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # unused for features

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 149 -> 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)                          # 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                         # 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)                          # 35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)                                                      # 35 -> 17 -> 8
        return x.mean(dim=(2, 3))                                             # pool_3: (N, 2048)


class InceptionV3Features(FeatureExtractor):
    """2048-d pool features of the FID Inception-v3 (the network of
    pt_inception-2015-12-05-6726825d.pth). The weights file must be supplied; nothing is
    downloaded. Images are resized bilinearly to 299x299 (they are already in [-1, 1], the
    network's input range; the map is linear, so resizing before or after scaling agrees)."""

    dim = 2048
    batch_size = 32

    def __init__(self, weights_path, device="cpu"):
        self.net = FIDInceptionV3()
        load_state_dict_strict(self.net, weights_path, "FID Inception-v3")
        self.name = "inception-v3-fid"
        self.weights_path = str(weights_path)
        self.net.to(device).eval()

    @classmethod
    def random(cls, seed: int = 0) -> "InceptionV3Features":
        """The same network with random weights (tests only: its FID numbers mean nothing)."""
        self = cls.__new__(cls)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = FIDInceptionV3().eval()
        self.name = "inception-v3-random"
        self.weights_path = None
        return self

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return x


# ----- shapes CNN
SHAPES_WEIGHTS = "shapes_features.safetensors"
SHAPES_RECORD = "shapes_features.json"


class ShapesCNN(nn.Module):
    """A small classifier of the "shapes" labels; `features` is the globally pooled last conv
    layer (the penultimate layer, `width * 4` numbers), `forward` the logits."""

    def __init__(self, num_classes: int = 10, width: int = 16, image_size: int = 32, groups: int = 8):
        super().__init__()
        self.config = dict(num_classes=num_classes, width=width, image_size=image_size, groups=groups)
        w = width
        chans = [(3, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w)]
        layers = []
        for i, (cin, cout) in enumerate(chans):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU()]
            if i < len(chans) - 1:
                layers.append(nn.AvgPool2d(2))  # 32 -> 16 -> 8 -> 4
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(4 * w, num_classes)
        self.feature_dim = 4 * w

    def features(self, x):
        return self.trunk(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


class _FeatureNet(nn.Module):
    def __init__(self, cnn: ShapesCNN):
        super().__init__()
        self.cnn = cnn

    def forward(self, x):
        return self.cnn.features(x)


class ShapesFeatures(FeatureExtractor):
    """Penultimate-layer features of a `ShapesCNN` (images resized to its training size)."""

    def __init__(self, cnn: ShapesCNN, name: str = "shapes-cnn"):
        self.cnn = cnn.eval()
        self.net = _FeatureNet(self.cnn)
        self.name = name
        self.dim = cnn.feature_dim

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        size = self.cnn.config["image_size"]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x


def load_shapes_features(path, device="cpu") -> ShapesFeatures:
    """A trained shapes feature extractor from its folder (or its JSON record)."""
    path = Path(os.path.expanduser(str(path)))
    record_file = path / SHAPES_RECORD if path.is_dir() or path.suffix != ".json" else path
    if not record_file.is_file():
        raise FileNotFoundError(f"{record_file}: no shapes-features record (train one with "
                                "`fastdiff train-features`)")
    try:
        record = json.loads(record_file.read_text())
        cnn = ShapesCNN(**record["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{record_file}: unreadable shapes-features record ({type(e).__name__}: {e})") from None
    load_state_dict_strict(cnn, record_file.parent / SHAPES_WEIGHTS, "shapes-features")
    extractor = ShapesFeatures(cnn, name=f"shapes-cnn(steps={record.get('steps')}, seed={record.get('seed')})")
    extractor.record = record
    return extractor.to(device)
