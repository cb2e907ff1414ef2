"""Step schedules: which timesteps a sampler visits.

Discrete-time models (a `GaussianDiffusion`) are only ever evaluated at their own timesteps:
`uniform`, `leading`, `trailing`, `quadratic` pick table indices directly; `logsnr` (uniform
in lambda = log(alpha / sigma), Lu et al. 2022) and `karras` (Karras et al. 2022, Eq. 5,
rho = 7) place targets between the table's end points and snap each to the nearest knot in
log-SNR, moving a duplicate to the next free knot so that exactly `steps` distinct timesteps
come back. Continuous-time processes (`fastdiff.sde.SDE`) take the targets as they are.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
import torch

from fastdiff.diffusion import _check_choice

SPACINGS = ("uniform", "leading", "trailing", "quadratic", "logsnr", "karras")
TABLE_SPACINGS = ("uniform", "leading", "trailing", "quadratic")
KARRAS_RHO = 7.0


def _check_steps(steps, T: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {type(steps).__name__} ({steps!r})")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, T={T}], got {steps}")
    return int(steps)


def space_timesteps(T: int, steps: int, spacing: str = "uniform") -> List[int]:
    """`steps` distinct timesteps in [0, T-1], ascending.

    uniform:   round(linspace(0, T-1, steps)), holding both 0 and T-1 (T-1 alone for steps=1)
    leading:   0, r, 2r, ... with r = T // steps (diffusers' "leading")
    trailing:  round(T - k T / steps) - 1 for k < steps, ending at T-1 (diffusers' "trailing")
    quadratic: int(linspace(0, sqrt(0.8 T), steps)^2) (Song et al.'s DDIM code)
    """
    _check_choice("spacing", spacing, TABLE_SPACINGS)
    steps = _check_steps(steps, T)
    if spacing == "uniform":
        ts = [T - 1] if steps == 1 else np.round(np.linspace(0, T - 1, steps)).astype(np.int64).tolist()
    elif spacing == "leading":
        ts = (np.arange(steps) * (T // steps)).tolist()
    elif spacing == "trailing":
        ts = (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)[:steps].tolist()
    else:
        ts = (np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(np.int64).tolist()
        if len(set(ts)) != steps:
            raise ValueError(f"spacing='quadratic' gives repeated timesteps for steps={steps} with T={T}; "
                             f"use at most about {int(np.sqrt(0.8 * T))} steps or another spacing")
    return sorted(set(int(t) for t in ts))


def log_snr_targets(lam_max: float, lam_min: float, steps: int, spacing: str) -> np.ndarray:
    """`steps` log-SNR values from lam_min (noisiest) to lam_max, in sampling order."""
    if steps == 1:
        return np.array([lam_min])
    if spacing == "logsnr":
        return np.linspace(lam_min, lam_max, steps)
    # Karras et al. Eq. 5 on sigma~ = sigma / alpha = exp(-lambda)
    s_max, s_min = math.exp(-lam_min), math.exp(-lam_max)
    ramp = np.linspace(0.0, 1.0, steps)
    sig = (s_max ** (1 / KARRAS_RHO) + ramp * (s_min ** (1 / KARRAS_RHO) - s_max ** (1 / KARRAS_RHO))) ** KARRAS_RHO
    return -np.log(sig)


def snap_distinct(table_log_snr: np.ndarray, targets: Sequence[float]) -> List[int]:
    """Table indices nearest to each target log-SNR (targets in sampling order, i.e. increasing
    lambda), made strictly decreasing: a duplicate moves to the next free index."""
    lam = np.asarray(table_log_snr, dtype=np.float64)       # decreasing in the index
    n, T = len(targets), len(lam)
    out: List[int] = []
    for i, target in enumerate(targets):
        k = int(np.argmin(np.abs(lam - target)))
        if out:
            k = min(k, out[-1] - 1)
        out.append(max(k, n - 1 - i))
    assert len(set(out)) == n and all(0 <= k < T for k in out)
    return out


def table_indices(alphas_cumprod: torch.Tensor, steps: int, spacing: str) -> List[int]:
    """`steps` distinct indices of a schedule's table for any spacing, ascending."""
    _check_choice("spacing", spacing, SPACINGS)
    T = alphas_cumprod.numel()
    steps = _check_steps(steps, T)
    if spacing in TABLE_SPACINGS:
        return space_timesteps(T, steps, spacing)
    ac = alphas_cumprod.double()
    lam = (0.5 * (torch.log(ac) - torch.log1p(-ac))).numpy()
    return sorted(snap_distinct(lam, log_snr_targets(lam[0], lam[-1], steps, spacing)))
