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
    import scipy.linalg  # optional (fastdiff[report]); only this route needs it

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

        from fastdiff.io import atomic_write_bytes
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


