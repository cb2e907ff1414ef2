"""Triton `sampler_step` and `randn`: the fused reverse step with in-kernel Philox noise.

Same maths and the same noise stream as fastdiff/ops/sampler_step.py (the reference) and
csrc/cpu/sampler_step.cpp: Philox4x32-10 on counter (element // 4, sample, step, 0) with
key (seed mod 2^32, seed >> 32), in 32-bit unsigned arithmetic (`umulhi` for the high
word), so the integers are identical; Box-Muller turns each 4-word block into 4 normals.
Storage fp32 / fp16 / bf16 (fp64 too, computed in fp64); arithmetic in fp32.

Each program handles BLOCK consecutive elements of one sample: BLOCK / 4 Philox calls,
whose 4 normals are interleaved back into element order with two `tl.join`s.

Two entry points share one kernel:
- `sampler_step_triton(...)`: scalar coefficients and step from the host (the custom op
  `fastdiff::sampler_step` calls it for CUDA tensors),
- `sampler_step_table_triton(...)`: coefficients read from a device table (S, 7) at a
  device-side step index, so a CUDA graph can replay one captured step for every step.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from fastdiff.triton_kernels._common import device_guard, on_tensor_device, split_fp64

# Kernels may only read globals that are constexpr.
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
TWO_PI = tl.constexpr(6.283185307179586)
INV_2_24 = tl.constexpr(5.9604644775390625e-08)  # 2^-24

BLOCK = 1024
_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- device helpers
@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors; k0, k1 uint32 scalars (the key)."""
    for rnd in tl.static_range(10):
        if rnd > 0:
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _uniform_open01(bits):
    """23 random bits -> odd multiple of 2^-24 in (0, 1), exact in fp32."""
    return (((bits >> 9) << 1) | 1).to(tl.float32) * INV_2_24


@triton.jit
def _philox_normals(first_quad, sample, step, k0, k1, QUADS: tl.constexpr):
    """4 * QUADS normals for elements 4*first_quad ... in element order (fp32, shape (4*QUADS,)).

    first_quad, sample, step, k0, k1: uint32 scalars.
    """
    c0 = first_quad + tl.arange(0, QUADS).to(tl.uint32)
    zero = tl.zeros((QUADS,), dtype=tl.uint32)
    r0, r1, r2, r3 = _philox4x32_10(c0, zero + sample, zero + step, zero, k0, k1)
    radius_a = tl.sqrt(-2.0 * tl.log(_uniform_open01(r0)))
    radius_b = tl.sqrt(-2.0 * tl.log(_uniform_open01(r2)))
    angle_a = TWO_PI * _uniform_open01(r1)
    angle_b = TWO_PI * _uniform_open01(r3)
    n0 = radius_a * tl.cos(angle_a)
    n1 = radius_a * tl.sin(angle_a)
    n2 = radius_b * tl.cos(angle_b)
    n3 = radius_b * tl.sin(angle_b)
    # join(join(n0, n2), join(n1, n3))[q, i, j] = n_{2i + j}: row-major flattening is element order
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (4 * QUADS,))


@triton.jit
def _f64(hi, lo, lo2):
    """hi + lo + lo2 in fp64: the double split by `split_fp64` into three fp32 scalars."""
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64) + tl.cast(lo2, tl.float64)


# --------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["step_arg", "key_lo", "key_hi", "sample_offset"])
def _sampler_step_kernel(
    x_ptr,            # in,  (batch, numel) dense
    out_ptr,          # in,  (batch, out_stride): mean part [0, numel), variance part [numel, 2 numel)
    y_ptr,            # out, (batch, numel) dense, x's dtype
    coef_ptr,         # in,  (S, 7) float64 table [a1, a2, c1, c2, sigma, min_log, max_log]; FROM_TABLE only
    index_ptr,        # in,  () int64 step index into the table, also the Philox step; FROM_TABLE only
    table_rows,       # S; the index is clamped to [0, S) so no launch reads outside the table
    a1, a2, c1, c2, sigma, min_log, max_log,  # fp32 scalars (the high part of each); when not FROM_TABLE
    a1_lo, a2_lo, c1_lo, c2_lo, sigma_lo, min_log_lo, max_log_lo,  # COMPUTE_F64: the rest, as fp32 pairs
    a1_lo2, a2_lo2, c1_lo2, c2_lo2, sigma_lo2, min_log_lo2, max_log_lo2,  # (value = hi + lo + lo2 exactly)
    step_arg,         # Philox step (< 2^32); used when not FROM_TABLE
    key_lo, key_hi,   # seed mod 2^32, seed >> 32
    sample_offset,    # global index of sample 0
    numel,            # elements per sample
    out_stride,       # elements between samples of out
    blocks_per_sample,
    MODE: tl.constexpr,        # 0 fixed, 1 learned, 2 learned_range
    CLIP: tl.constexpr,
    NOISE: tl.constexpr,       # False: sigma is known to be 0 (per-step path only)
    FROM_TABLE: tl.constexpr,
    COMPUTE_F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // blocks_per_sample
    block = pid % blocks_per_sample
    first = block * BLOCK
    offs = first + tl.arange(0, BLOCK)
    mask = offs < numel
    sample64 = sample.to(tl.int64)
    acc = tl.float64 if COMPUTE_F64 else tl.float32

    if COMPUTE_F64 and not FROM_TABLE:  # Triton passes Python floats as fp32: rebuild the doubles
        a1 = _f64(a1, a1_lo, a1_lo2)
        a2 = _f64(a2, a2_lo, a2_lo2)
        c1 = _f64(c1, c1_lo, c1_lo2)
        c2 = _f64(c2, c2_lo, c2_lo2)
        sigma = _f64(sigma, sigma_lo, sigma_lo2)
        min_log = _f64(min_log, min_log_lo, min_log_lo2)
        max_log = _f64(max_log, max_log_lo, max_log_lo2)
    if FROM_TABLE:
        idx = tl.minimum(tl.maximum(tl.load(index_ptr), 0), table_rows - 1)
        row = coef_ptr + idx * 7
        a1 = tl.load(row + 0).to(acc)
        a2 = tl.load(row + 1).to(acc)
        c1 = tl.load(row + 2).to(acc)
        c2 = tl.load(row + 3).to(acc)
        sigma = tl.load(row + 4).to(acc)
        min_log = tl.load(row + 5).to(acc)
        max_log = tl.load(row + 6).to(acc)
    if FROM_TABLE:
        step = idx.to(tl.uint32)
    else:
        step = step_arg.to(tl.int64).to(tl.uint32)

    x = tl.load(x_ptr + sample64 * numel + offs, mask=mask, other=0.0).to(acc)
    out_row = out_ptr + sample64 * out_stride
    m = tl.load(out_row + offs, mask=mask, other=0.0).to(acc)
    x0 = a1 * x + a2 * m
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    value = c1 * x0 + c2 * x
    # NOISE: sigma may be nonzero (per-step path: known on the host). The table path decides on
    # the device, per launch: sigma == 0 (eta = 0, the last step) skips Philox altogether.
    if NOISE:
        if sigma != 0.0:
            k0 = key_lo.to(tl.int64).to(tl.uint32)
            k1 = key_hi.to(tl.int64).to(tl.uint32)
            counter_sample = (sample_offset + sample64).to(tl.uint32)
            z = _philox_normals((first // 4).to(tl.uint32), counter_sample, step, k0, k1, BLOCK // 4)
            scale = sigma
            if MODE == 1:
                v = tl.load(out_row + numel + offs, mask=mask, other=0.0).to(acc)
                scale = sigma * tl.exp(0.5 * v)
            if MODE == 2:
                v = tl.load(out_row + numel + offs, mask=mask, other=0.0).to(acc)
                frac = 0.5 * (v + 1.0)  # Eq. 101 (errata): v in [-1, 1]
                scale = sigma * tl.exp(0.5 * (frac * max_log + (1.0 - frac) * min_log))
            value = value + scale * z.to(acc)
    tl.store(y_ptr + sample64 * numel + offs, value.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["step_arg", "key_lo", "key_hi", "sample_offset"])
def _normal_kernel(
    y_ptr,            # out, (batch, numel) dense
    step_arg, key_lo, key_hi, sample_offset,
    numel, blocks_per_sample,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // blocks_per_sample
    first = (pid % blocks_per_sample) * BLOCK
    offs = first + tl.arange(0, BLOCK)
    sample64 = sample.to(tl.int64)
    z = _philox_normals((first // 4).to(tl.uint32), (sample_offset + sample64).to(tl.uint32),
                        step_arg.to(tl.int64).to(tl.uint32), key_lo.to(tl.int64).to(tl.uint32),
                        key_hi.to(tl.int64).to(tl.uint32), BLOCK // 4)
    tl.store(y_ptr + sample64 * numel + offs, z.to(y_ptr.dtype.element_ty), mask=offs < numel)


@triton.jit(do_not_specialize=["key_lo", "key_hi"])
def _philox_bits_kernel(
    c_ptr,            # in,  (4, n) int64 counters holding uint32 values
    r_ptr,            # out, (4, n) int64: the Philox words (uint32 values)
    key_lo, key_hi, n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c0 = tl.load(c_ptr + offs, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(c_ptr + n + offs, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(c_ptr + 2 * n + offs, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(c_ptr + 3 * n + offs, mask=mask, other=0).to(tl.uint32)
    r0, r1, r2, r3 = _philox4x32_10(c0, c1, c2, c3, key_lo.to(tl.int64).to(tl.uint32),
                                    key_hi.to(tl.int64).to(tl.uint32))
    tl.store(r_ptr + offs, r0.to(tl.int64), mask=mask)
    tl.store(r_ptr + n + offs, r1.to(tl.int64), mask=mask)
    tl.store(r_ptr + 2 * n + offs, r2.to(tl.int64), mask=mask)
    tl.store(r_ptr + 3 * n + offs, r3.to(tl.int64), mask=mask)


# --------------------------------------------------------------------------- launchers
def _prepare(x_t: torch.Tensor, model_output: torch.Tensor, variance_mode: int):
    """Dense x and an output whose samples are dense rows; returns (x, out, numel, out_stride)."""
    x = x_t.contiguous()
    batch = x.shape[0]
    numel = x[0].numel() if batch else 0
    out = model_output
    if variance_mode == 0 and out.dim() >= 1 and batch:
        # A slice out[:, :C] of a contiguous (B, 2C, ...) output is read in place.
        dense_rows = all(st == exp for st, exp, sz in zip(
            reversed(out.stride()[1:]), _row_major(out.shape[1:]), reversed(out.shape[1:])) if sz != 1)
        if not dense_rows:
            out = out.contiguous()
    else:
        out = out.contiguous()
    out_stride = out.stride(0) if (variance_mode == 0 and batch > 1) else 2 * numel if variance_mode else numel
    return x, out, numel, out_stride


def _row_major(sizes) -> list:
    strides, acc = [], 1
    for s in reversed(tuple(sizes)):
        strides.append(acc)
        acc *= s
    return strides


def _launch(x_t, model_output, coefs, coef_table, step_index, seed, step, sample_offset, clip_denoised,
            variance_mode, noise: bool, result=None) -> torch.Tensor:
    x, out, numel, out_stride = _prepare(x_t, model_output, variance_mode)
    # Writing into `result` (x_t itself is fine: every program reads its block before storing it)
    direct = result is not None and result.is_contiguous() and result.dtype == x.dtype
    y = result if direct else torch.empty_like(x)
    batch = x.shape[0]
    if batch == 0 or numel == 0:
        return y if result is None else result
    blocks = triton.cdiv(numel, BLOCK)
    # Triton passes Python floats as fp32: each coefficient goes as three fp32 parts that the
    # fp64 kernel sums back exactly (no per-step host-to-device copy, legal inside a capture).
    parts = list(zip(*(split_fp64(float(c)) for c in coefs)))
    from_table = coef_table is not None
    dummy = x
    with device_guard(x):
        _sampler_step_kernel[(batch * blocks,)](
            x, out, y,
            coef_table if from_table else dummy, step_index if from_table else dummy,
            coef_table.shape[0] if from_table else 1,
            *parts[0], *parts[1], *parts[2],
            int(step), seed & _MASK32, seed >> 32, int(sample_offset), numel, out_stride, blocks,
            MODE=int(variance_mode), CLIP=bool(clip_denoised), NOISE=bool(noise), FROM_TABLE=from_table,
            COMPUTE_F64=x.dtype == torch.float64, BLOCK=BLOCK, num_warps=4,
        )
    if result is not None and not direct:
        result.copy_(y)
        return result
    return y


@on_tensor_device
def sampler_step_triton(x_t: torch.Tensor, model_output: torch.Tensor, coefs: Sequence[float], seed: int,
                        step: int, sample_offset: int, clip_denoised: bool, variance_mode: int,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One fused reverse step (arguments as `fastdiff::sampler_step`, already checked); with
    `out` (x_t allowed) the result is written there, as `fastdiff::sampler_step_out`."""
    return _launch(x_t, model_output, coefs, None, None, seed, step, sample_offset, clip_denoised,
                   variance_mode, noise=float(coefs[4]) != 0.0, result=out)


@on_tensor_device
def sampler_step_table_triton(x_t: torch.Tensor, model_output: torch.Tensor, coef_table: torch.Tensor,
                              step_index: torch.Tensor, seed: int, sample_offset: int, clip_denoised: bool,
                              variance_mode: int) -> torch.Tensor:
    """The step at device-side index `step_index` (0-d int64), coefficients from `coef_table` (S, 7)
    float64; no host synchronisation (arguments as `fastdiff::sampler_step_table`)."""
    return _launch(x_t, model_output, (0.0,) * 7, coef_table.contiguous(), step_index, seed, 0, sample_offset,
                   clip_denoised, variance_mode, noise=True)


def randn_triton(shape: Tuple[int, ...], seed: int, step: int, sample_offset: int = 0,
                 dtype: torch.dtype = torch.float32, device="cuda") -> torch.Tensor:
    """Standard normals from the fastdiff stream (shape[0] is the sample index); the same
    numbers as `fastdiff.ops.randn`."""
    shape = tuple(int(s) for s in shape)
    y = torch.empty(shape, dtype=dtype, device=device)
    batch = shape[0] if shape else 0
    numel = y[0].numel() if batch else 0
    if batch and numel:
        blocks = triton.cdiv(numel, BLOCK)
        with device_guard(y):
            _normal_kernel[(batch * blocks,)](y, int(step), seed & _MASK32, seed >> 32, int(sample_offset), numel,
                                              blocks, BLOCK=BLOCK, num_warps=4)
    return y


def philox_bits_triton(counters: torch.Tensor, key: int) -> torch.Tensor:
    """The raw Philox4x32-10 words of the kernels' generator: counters (4, n) int64 holding uint32
    values -> (4, n) int64 (for tests against the Random123 answers and the reference)."""
    counters = counters.to(torch.int64).contiguous()
    n = counters.shape[1]
    out = torch.empty_like(counters)
    if n:
        with device_guard(out):
            _philox_bits_kernel[(triton.cdiv(n, 256),)](counters, out, key & _MASK32, key >> 32, n, BLOCK=256)
    return out
