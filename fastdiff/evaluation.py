"""Sample-quality metrics: FID, KID, precision/recall, and the feature extractors they use.

- `frechet_distance` — the Fréchet (2-Wasserstein) distance between two Gaussians
  N(μ1, Σ1), N(μ2, Σ2):  ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}
  (Dowson & Landau 1982; used as FID by Heusel et al. 2017).
- `FeatureStats` — running mean and covariance in float64, mergeable, saved as .npz.
- `kid` — Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² with the
  kernel k(x, y) = (xᵀy / d + 1)³, mean and standard deviation over random subsets.
- `precision_recall` — Kynkäänniemi et al. 2019: k-NN balls around each set's features
  as an estimate of its manifold; precision = share of generated features inside the real
  manifold, recall = share of real features inside the generated one.
- Feature extractors (`FeatureExtractor`): `InceptionV3Features` (the FID network, weights
  supplied by the user, never downloaded) and `ShapesFeatures` (a small CNN trained here on
  the embedded "shapes" data: `train_shapes_features`, `load_shapes_features`).

All statistics are float64 numpy; extractors take torch images in [-1, 1] (N, C, H, W).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor]

#: A square root's imaginary part counts as significant above this share of its real scale.
#: For the eigen route the same test reads: an eigenvalue λ < 0 with √|λ| / √λ_max > tol.
IMAG_TOL = 1e-3


# --------------------------------------------------------------------------- input checks
def _as_float64(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__} ({e})") from None
    return arr


def _check_gaussian(mu: ArrayLike, sigma: ArrayLike, name: str) -> Tuple[np.ndarray, np.ndarray]:
    mu = _as_float64(mu, f"mu{name}")
    sigma = _as_float64(sigma, f"sigma{name}")
    if mu.ndim != 1 or mu.shape[0] == 0:
        raise ValueError(f"mu{name} must be a non-empty vector (D,), got shape {mu.shape}")
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"sigma{name} must be a square matrix (D, D), got shape {sigma.shape}")
    if sigma.shape[0] != mu.shape[0]:
        raise ValueError(f"sigma{name} is {sigma.shape} but mu{name} has D={mu.shape[0]}; expected "
                         f"({mu.shape[0]}, {mu.shape[0]})")
    if not np.isfinite(mu).all():
        raise ValueError(f"mu{name} has {np.count_nonzero(~np.isfinite(mu))} non-finite (NaN/inf) entries")
    if not np.isfinite(sigma).all():
        raise ValueError(f"sigma{name} has {np.count_nonzero(~np.isfinite(sigma))} non-finite (NaN/inf) entries")
    scale = max(np.abs(sigma).max(), np.finfo(np.float64).tiny)
    asym = np.abs(sigma - sigma.T).max()
    if asym > 1e-6 * scale:
        raise ValueError(f"sigma{name} is not symmetric: max |Σ - Σᵀ| = {asym:.3g} (max |Σ| = {scale:.3g}); "
                         "a covariance matrix must be symmetric")
    return mu, (sigma + sigma.T) / 2


# --------------------------------------------------------------------------- Fréchet distance
def _sqrt_psd(a: np.ndarray, what: str) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix by eigh; tiny negative eigenvalues
    (roundoff) are clipped, significant ones raise (their root would be imaginary)."""
    w, v = np.linalg.eigh(a)
    _check_negative_eigenvalues(w, what)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_negative_eigenvalues(w: np.ndarray, what: str) -> None:
    top = max(w.max(initial=0.0), np.finfo(np.float64).tiny)
    if w.min() < 0 and math.sqrt(-w.min() / top) > IMAG_TOL:
        raise ValueError(f"{what} has eigenvalue {w.min():.4g} (largest {top:.4g}): its square root has a "
                         f"significant imaginary part (relative {math.sqrt(-w.min() / top):.3g} > {IMAG_TOL}); "
                         "the covariances are not positive semi-definite")


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr (Σ1 Σ2)^{1/2} = tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}: Σ1 Σ2 is similar to the symmetric PSD
    matrix M = Σ1^{1/2} Σ2 Σ1^{1/2} (same eigenvalues λ_i ≥ 0), so the trace is Σ √λ_i."""
    root1 = _sqrt_psd(sigma1, "sigma1")
    m = root1 @ sigma2 @ root1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    _check_negative_eigenvalues(w, "sigma1^(1/2) sigma2 sigma1^(1/2)")
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        raise np.linalg.LinAlgError("sqrtm(sigma1 @ sigma2) is not finite")
    if np.iscomplexobj(covmean):
        scale = max(np.abs(covmean.real).max(), np.finfo(np.float64).tiny)
        imag = np.abs(covmean.imag).max()
        if imag > IMAG_TOL * scale:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has a significant imaginary part: max |Im| = {imag:.4g} "
                             f"vs max |Re| = {scale:.4g} (relative > {IMAG_TOL}); the covariances are not "
                             "positive semi-definite")
        covmean = covmean.real  # roundoff only
    return float(np.trace(covmean))


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6,
                     method: str = "eigh") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:

        d² = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}.

    method="eigh" (default) takes tr (Σ1 Σ2)^{1/2} as Σ √λ_i(Σ1^{1/2} Σ2 Σ1^{1/2}): both
    eigen-decompositions are of symmetric matrices, which LAPACK solves backward-stably with
    real eigenvalues, so rank-deficient covariances (fewer samples than feature dimensions,
    the usual case for 2048-d features) give exact zeros instead of the spurious complex parts
    and ill-conditioned Schur blocks that a general square root of the non-symmetric product
    Σ1 Σ2 runs into. method="sqrtm" is that general route (scipy.linalg.sqrtm), kept as a
    cross-check. Either way a significant imaginary part (non-PSD input) raises ValueError and
    a negligible one is dropped; when the square root is not finite, eps·I is added to both
    covariances and it is tried once more.
    """
    if method not in ("eigh", "sqrtm"):
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "1")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"dimensions differ: mu1/sigma1 have D={mu1.shape[0]}, mu2/sigma2 have D={mu2.shape[0]}")
    trace_sqrt = _trace_sqrt_product_eigh if method == "eigh" else _trace_sqrt_product_sqrtm
    try:
        tr_covmean = trace_sqrt(sigma1, sigma2)
        if not math.isfinite(tr_covmean):
            raise np.linalg.LinAlgError("non-finite trace")
    except np.linalg.LinAlgError:
        # near-singular product: regularise both covariances by eps·I and retry once
        offset = eps * np.eye(sigma1.shape[0])
        tr_covmean = trace_sqrt(sigma1 + offset, sigma2 + offset)
        if not math.isfinite(tr_covmean):
            raise ValueError(f"Fréchet distance is not finite even with eps={eps} added to the covariances")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# --------------------------------------------------------------------------- feature statistics
def _as_features(f: ArrayLike, name: str) -> np.ndarray:
    f = _as_float64(f, name)
    if f.ndim != 2 or f.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D array of features (N, F), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name} has {np.count_nonzero(~np.isfinite(f))} non-finite (NaN/inf) entries")
    return f


class FeatureStats:
    """Running mean and covariance of feature vectors, accumulated in float64.

    Batches are combined by the pairwise update of Chan, Golub & LeVeque (1979): for parts
    (n_a, μ_a, M_a) and (n_b, μ_b, M_b), with M the sum of outer products of deviations,
    M = M_a + M_b + δδᵀ n_a n_b / n, δ = μ_b − μ_a — no catastrophic cancellation of
    Σxxᵀ − nμμᵀ. `merge` uses the same rule, so the order of batches does not matter.
    """

    def __init__(self, dim: int, name: str = ""):
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.name = name
        self.n = 0
        self._mean = np.zeros(self.dim)
        self._m2 = np.zeros((self.dim, self.dim))

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a = self.n
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.n = n

    def update(self, features: ArrayLike) -> "FeatureStats":
        f = _as_features(features, "features")
        if f.shape[1] != self.dim:
            raise ValueError(f"features have dimension {f.shape[1]}, these stats have {self.dim}")
        if f.shape[0]:
            mean_b = f.mean(axis=0)
            dev = f - mean_b
            self._combine(f.shape[0], mean_b, dev.T @ dev)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Fold `other` into these stats (in place); returns self."""
        if not isinstance(other, FeatureStats):
            raise TypeError(f"can only merge FeatureStats, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dimension {other.dim} into stats of dimension {self.dim}")
        if other.n:
            self._combine(other.n, other._mean, other._m2)
        return self

    @property
    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("no features accumulated yet")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by n − 1), as numpy.cov."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, have {self.n}")
        return self._m2 / (self.n - 1)

    def frechet_distance(self, other: "FeatureStats", **kwargs) -> float:
        return frechet_distance(self.mean, self.cov, other.mean, other.cov, **kwargs)

    def save(self, path) -> None:
        """Write to .npz (plain arrays; readable with allow_pickle=False), atomically."""
        import io

        from fastdiff.train import atomic_write_bytes
        buf = io.BytesIO()
        np.savez(buf, n=np.int64(self.n), mean=self._mean, m2=self._m2, name=np.array(self.name),
                 format=np.array("fastdiff.FeatureStats/1"))
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path) -> "FeatureStats":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such feature-statistics file")
        try:
            with np.load(path, allow_pickle=False) as z:
                n, mean, m2, name = int(z["n"]), z["mean"], z["m2"], str(z["name"])
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{path}: not a FeatureStats .npz file ({type(e).__name__}: {e})") from None
        if mean.ndim != 1 or m2.shape != (mean.shape[0], mean.shape[0]) or n < 0:
            raise ValueError(f"{path}: inconsistent FeatureStats (n={n}, mean {mean.shape}, m2 {m2.shape})")
        stats = cls(mean.shape[0], name=name)
        stats.n, stats._mean, stats._m2 = n, mean.astype(np.float64), m2.astype(np.float64)
        return stats

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, n={self.n}, name={self.name!r})"


def fid_from_features(features1: ArrayLike, features2: ArrayLike, **kwargs) -> float:
    """FID between two feature sets (N1, F) and (N2, F): Fréchet distance of their Gaussians
    (sample mean, unbiased sample covariance)."""
    f1 = _as_features(features1, "features1")
    f2 = _as_features(features2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}")
    for name, f in (("features1", f1), ("features2", f2)):
        if f.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 rows for a covariance, got {f.shape[0]}")
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False).reshape(f1.shape[1], -1),
                            f2.mean(0), np.cov(f2, rowvar=False).reshape(f2.shape[1], -1), **kwargs)


# --------------------------------------------------------------------------- KID
def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² (Gretton et al. 2012, Lemma 6) with k(a, b) = (aᵀb / d + 1)³."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    sum_xx = k_xx.sum() - np.trace(k_xx)  # i ≠ j
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.mean())


def kid(features1: ArrayLike, features2: ArrayLike, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> Tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD² estimate with the
    cubic polynomial kernel, on `subsets` random subsets of `subset_size` rows of each set
    (drawn without replacement; the size is capped at the smaller set). Returns (mean, std)
    over subsets; the estimate is unbiased, so it can be slightly negative for equal laws."""
    f1 = _as_features(features1, "features1")
    f2 = _as_features(features2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}")
    if int(subsets) < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(int(subset_size), f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 rows; got subset_size={subset_size} with "
                         f"{f1.shape[0]} and {f2.shape[0]} feature vectors")
    rng = np.random.default_rng(seed)
    values = np.empty(int(subsets))
    for s in range(int(subsets)):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        values[s] = _polynomial_mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std(ddof=1) if len(values) > 1 else 0.0)


# --------------------------------------------------------------------------- precision / recall
def _kth_neighbour_radii(f: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = torch.empty(f.shape[0], dtype=f.dtype)
    for s in range(0, f.shape[0], chunk):
        d = torch.cdist(f[s:s + chunk], f)
        radii[s:s + chunk] = d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0
    return radii


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, chunk: int) -> float:
    inside = 0
    for s in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[s:s + chunk], manifold)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real_features: ArrayLike, fake_features: ArrayLike, k: int = 3,
                     chunk: int = 1024) -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the
    union of balls around its points with radius = distance to the k-th nearest neighbour in
    the same set. precision = share of fake points in the real manifold; recall = share of
    real points in the fake manifold."""
    real = torch.from_numpy(_as_features(real_features, "real_features"))
    fake = torch.from_numpy(_as_features(fake_features, "fake_features"))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    if int(k) < 1 or min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"k must be >= 1 and below each set's size; got k={k}, sizes {real.shape[0]}, "
                         f"{fake.shape[0]}")
    precision = _coverage(real, _kth_neighbour_radii(real, k, chunk), fake, chunk)
    recall = _coverage(fake, _kth_neighbour_radii(fake, k, chunk), real, chunk)
    return precision, recall


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


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor), got {type(obj).__name__}")
    return obj


def load_state_dict_strict(module: nn.Module, path, what: str) -> None:
    """Load a state-dict file into `module` with strict=True; errors name the file and the keys."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} weights file not found")
    try:
        state = _read_state_dict(path)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: cannot read {what} weights ({type(e).__name__}: {e})") from None
    expected = set(module.state_dict())
    got = set(state)
    # BatchNorm fills a missing num_batches_tracked itself (files from older torch lack it)
    missing = sorted(k for k in expected - got if not k.endswith("num_batches_tracked"))
    unexpected = sorted(got - expected)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
        raise ValueError(f"{path}: not {what} weights: {len(missing)} missing keys [{show(missing)}], "
                         f"{len(unexpected)} unexpected keys [{show(unexpected)}]")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: {what} weights do not fit the network: {e}") from None


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


def train_shapes_features(out_dir, steps: int = 400, seed: int = 0, batch_size: int = 64, lr: float = 3e-3,
                          dataset_size: int = 4000, width: int = 16, image_size: int = 32,
                          progress: bool = False) -> Path:
    """Train the shapes feature CNN (cross-entropy on the labels) and save it to `out_dir` as
    safetensors + JSON (each written atomically). Deterministic by seed on a given machine
    and thread count. Returns the folder."""
    from safetensors.torch import save

    from fastdiff.data import load_dataset
    from fastdiff.train import atomic_write_bytes

    for name, v in (("steps", steps), ("batch_size", batch_size), ("dataset_size", dataset_size), ("width", width)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if image_size < 12:
        raise ValueError(f"image_size must be >= 12 (the shapes generator's smallest size), got {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = load_dataset("shapes", n=dataset_size, seed=seed, train=True, image_size=image_size)
    held_out = load_dataset("shapes", n=min(1000, dataset_size), seed=seed, train=False, image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapesCNN(num_classes=train.num_classes, width=width, image_size=train.shape[-1])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="shapes features")
    model.train()
    for step in it:
        x, y = train.batch(torch.randint(0, len(train), (batch_size,), generator=gen))
        if torch.rand((), generator=gen) < 0.5:  # horizontal flip: every class is symmetric enough
            x = x.flip(-1)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(held_out), 256):
            x, y = held_out.batch(range(s, min(len(held_out), s + 256)))
            correct += int((model(x).argmax(1) == y).sum())
    accuracy = correct / len(held_out)
    atomic_write_bytes(out / SHAPES_WEIGHTS, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    record = {"format": "fastdiff.ShapesFeatures/1", "model": model.config, "feature_dim": model.feature_dim,
              "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "dataset_size": dataset_size,
              "held_out_accuracy": accuracy, "held_out_n": len(held_out), "class_names": list(train.class_names)}
    atomic_write_bytes(out / SHAPES_RECORD, json.dumps(record, indent=2).encode())
    return out


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
