"""Noise schedules: beta_t and the tables derived from it, in float64.

Index convention: t = 0 .. T-1 in code is t = 1 .. T in the papers, so
alphas_cumprod[t] = prod_{s <= t} alphas[s] (thesis errata: the product starts at the
first step, not at zero).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch

ArrayLike = Union[Sequence[float], np.ndarray, torch.Tensor]


def _check_T(T) -> int:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)):
        raise TypeError(f"T must be an int, got {type(T).__name__} ({T!r})")
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    return int(T)


class NoiseSchedule:
    """A variance schedule beta_1..beta_T (stored as `betas[0..T-1]`, float64)."""

    def __init__(self, betas: ArrayLike, name: str = "custom"):
        betas = torch.as_tensor(np.asarray(betas, dtype=np.float64) if not isinstance(betas, torch.Tensor)
                                else betas.detach().cpu(), dtype=torch.float64).clone()
        if betas.dim() != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        # beta = 1 makes alpha = 0: every later alpha-bar is 0 and the reverse step divides by it
        ok = torch.isfinite(betas) & (betas > 0) & (betas < 1)
        if not ok.all():
            i = int((~ok).nonzero()[0])
            raise ValueError(f"betas must lie in (0, 1) (beta = 1 destroys the signal and makes sampling "
                             f"divide by zero), got betas[{i}] = {betas[i].item()!r}")
        self.name = name
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @property
    def T(self) -> int:
        return self.betas.numel()

    # -- constructors -------------------------------------------------------------
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """Ho et al.: betas linear from 1e-4 to 0.02 for T = 1000.

        For other T both end points scale by 1000 / T (improved-diffusion), so the
        schedule destroys the signal to the same degree whatever T is.
        """
        T = _check_T(T)
        for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not (isinstance(v, (int, float)) and 0 < v < 1):
                raise ValueError(f"{name} must lie in (0, 1), got {v!r}")
        scale = 1000.0 / T
        betas = np.linspace(beta_start * scale, beta_end * scale, T, dtype=np.float64)
        return cls(np.minimum(betas, 0.999), name="linear")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal, Eqs. 104-106: alphas_cumprod = f(t) / f(0), f = cos^2(...).

        beta_t = 1 - alphabar(t) / alphabar(t-1), clipped at `max_beta` so the last
        steps stay finite.
        """
        T = _check_T(T)
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s >= 0):
            raise ValueError(f"s must be a finite number >= 0, got {s!r}")
        if not (isinstance(max_beta, (int, float)) and 0 < max_beta < 1):
            raise ValueError(f"max_beta must lie in (0, 1) (it caps the last betas below 1), got {max_beta!r}")

        def f(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1.0 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
        return cls(betas, name="cosine")

    @classmethod
    def from_betas(cls, betas: ArrayLike) -> "NoiseSchedule":
        return cls(betas, name="custom")

    @classmethod
    def named(cls, name: str, T: int = 1000) -> "NoiseSchedule":
        if name == "linear":
            return cls.linear(T)
        if name == "cosine":
            return cls.cosine(T)
        raise ValueError(f"schedule must be 'linear' or 'cosine', got {name!r}")

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.name}, T={self.T})"


def extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] as like's dtype/device, shaped (B, 1, ..., 1) to broadcast against `like`.

    The one place a float64 table meets the data: gather first, then cast.
    """
    out = table.to(device=t.device)[t].to(like.dtype)
    return out.reshape(t.shape[0], *([1] * (like.dim() - 1)))
