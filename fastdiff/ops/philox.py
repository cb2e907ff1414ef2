"""Reference Philox4x32-10 normal stream, in plain torch integer arithmetic.

The noise for element e of sample i at sampler step k is a pure function of
(seed, i, k, e): Philox counter = (e // 4, i, k, 0), key = (seed mod 2^32, seed >> 32);
the four output words give two Box-Muller pairs, i.e. normals for elements 4q .. 4q+3.
csrc/cpu/philox.h and the Triton kernel compute the same integers.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
#: Step index reserved for drawing x_T, so it never collides with a sampler step.
INITIAL_NOISE_STEP = MASK32


def _mulhilo(a: torch.Tensor, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m, for int64 tensors holding values < 2^32."""
    p_hi = (a >> 16) * m  # < 2^48: exact in int64
    p_lo = (a & 0xFFFF) * m
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, key: int):
    """Philox4x32 with 10 rounds on int64 tensors (broadcastable) holding uint32 values."""
    k0, k1 = key & MASK32, (key >> 32) & MASK32
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uniform_open01(bits: torch.Tensor) -> torch.Tensor:
    """23 bits -> odd multiple of 2^-24 in (0, 1), exactly as the kernels do (float64)."""
    return (((bits >> 9) << 1) | 1).to(torch.float64) * 2.0 ** -24


def philox_normal_reference(batch: int, numel_per_sample: int, *, seed: int, step: int,
                            sample_offset: int = 0, device="cpu") -> torch.Tensor:
    """Normals of shape (batch, numel_per_sample), float64, from the fastdiff stream."""
    quads = (numel_per_sample + 3) // 4
    c0 = torch.arange(quads, dtype=torch.int64, device=device).unsqueeze(0)
    c1 = (sample_offset + torch.arange(batch, dtype=torch.int64, device=device)).unsqueeze(1)
    c2 = torch.full((1, 1), step, dtype=torch.int64, device=device)
    c3 = torch.zeros((1, 1), dtype=torch.int64, device=device)
    c0, c1 = c0.expand(batch, quads), c1.expand(batch, quads)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2.expand(batch, quads), c3.expand(batch, quads), seed)
    radius_a = torch.sqrt(-2.0 * torch.log(uniform_open01(r0)))
    radius_b = torch.sqrt(-2.0 * torch.log(uniform_open01(r2)))
    angle_a = 2.0 * math.pi * uniform_open01(r1)
    angle_b = 2.0 * math.pi * uniform_open01(r3)
    z = torch.stack([radius_a * torch.cos(angle_a), radius_a * torch.sin(angle_a),
                     radius_b * torch.cos(angle_b), radius_b * torch.sin(angle_b)], dim=-1)
    return z.reshape(batch, quads * 4)[:, :numel_per_sample]
