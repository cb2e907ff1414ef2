"""The statistics of the report: Student-t intervals (bits/dim, oracle MMD² over seeds), normal
bootstrap intervals of the FID-like metric, and the MMD² between samples and an exact mixture law.

Tested against independent truths in tests/test_reproduce.py (closed-form t quantiles, coverage
simulations, Monte Carlo MMD²)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def t_interval(values, confidence: float = 0.95) -> Tuple[float, float, float]:
    """(mean, low, high): the Student-t interval for the mean of i.i.d. values,
    mean ± t_{n-1}((1 + confidence) / 2) · s / √n."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size < 2:
        raise ValueError(f"values must hold at least 2 numbers for an interval, got {v.size}")
    _check_confidence(confidence)
    mean = float(v.mean())
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def normal_bootstrap_interval(point: float, replicates, confidence: float = 0.95) -> Tuple[float, float]:
    """point ± z · (standard deviation of the bootstrap replicates).

    Not the percentile interval: resampling with replacement duplicates images, which lowers
    a sample set's diversity and biases a resampled FID upwards, often so far that the
    percentile interval excludes the point estimate. The replicates' spread is still a fair
    estimate of the standard error."""
    from scipy import stats

    r = np.asarray(replicates, dtype=np.float64).ravel()
    if r.size < 2:
        raise ValueError(f"replicates must hold at least 2 numbers, got {r.size}")
    _check_confidence(confidence)
    half = float(stats.norm.ppf(0.5 + confidence / 2) * r.std(ddof=1))
    return point - half, point + half


def bootstrap_fid(gen: np.ndarray, ref: np.ndarray, reps: int, seed: int = 0,
                  other: Optional[np.ndarray] = None) -> Tuple[float, float, float]:
    """(FID, low, high) with a 95% normal bootstrap interval (resampling both the generated
    and the reference features). With `other` (generated from the same initial
    noise, row for row), the statistic is FID(gen) - FID(other), resampled pairwise."""
    from fastdiff.metrics import fid_from_features

    rng = np.random.default_rng(seed)

    def stat(ig, ir):
        value = fid_from_features(gen[ig], ref[ir])
        if other is not None:
            value -= fid_from_features(other[ig], ref[ir])
        return value

    point = stat(np.arange(len(gen)), np.arange(len(ref)))
    reps_ = [stat(rng.integers(0, len(gen), len(gen)), rng.integers(0, len(ref), len(ref))) for _ in range(reps)]
    lo, hi = normal_bootstrap_interval(point, reps_)
    return point, lo, hi


def _gaussian_kernel_mean(diff: torch.Tensor, cov: torch.Tensor, h: float) -> torch.Tensor:
    """E exp(-|X|^2 / (2 h^2)) for X ~ N(diff, cov), per row of diff (N, D): with S = cov + h^2 I,
    h^D / sqrt(det S) exp(-diff^T S^-1 diff / 2)."""
    D = cov.shape[-1]
    S = cov + h * h * torch.eye(D, dtype=cov.dtype)
    quad = (diff @ torch.linalg.inv(S) * diff).sum(-1)
    return h ** D / torch.sqrt(torch.linalg.det(S)) * torch.exp(-0.5 * quad)


def mmd2_to_mixture(x: torch.Tensor, mixture, bandwidth: float, chunk: int = 2048) -> float:
    """Unbiased MMD² with the kernel exp(-|x - y|^2 / (2 h^2)) between the law of the rows of
    x (N, D) and a GaussianMixture: the two terms that involve the mixture are exact
    Gaussian integrals, the sample-sample term is the U-statistic."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"x must hold at least 2 samples, got {n}")
    h = float(bandwidth)
    w, mu, cov = mixture.weights, mixture.means, mixture.covariances
    pp = sum(w[k] * w[l] * _gaussian_kernel_mean((mu[k] - mu[l]).reshape(1, -1), cov[k] + cov[l], h)[0]
             for k in range(len(w)) for l in range(len(w)))
    xp = sum(w[k] * _gaussian_kernel_mean(x - mu[k], cov[k], h) for k in range(len(w))).mean()
    xx = torch.zeros((), dtype=torch.float64)
    for s in range(0, n, chunk):
        d2 = torch.cdist(x[s:s + chunk], x).pow(2)
        xx += torch.exp(-d2 / (2 * h * h)).sum()
    xx = (xx - n) / (n * (n - 1))  # drop the diagonal k(x_i, x_i) = 1
    return float(xx - 2 * xp + pp)
