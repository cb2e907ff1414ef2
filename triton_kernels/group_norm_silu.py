"""Triton `group_norm_silu`: GroupNorm + affine + SiLU, forward and backward, NCS and NSC.

    y = silu(w_c (x - mean_ng) rstd_ng + b_c)            (act=True; without silu when act=False)

x is seen as (N, C, S), S the flattened spatial size, either NCS-dense (contiguous NCHW)
or NSC-dense (channels_last). Every kernel works on (BLOCK_C channels x BLOCK_S positions)
tiles of one sample and walks a range of S, so the grid is (N x channel blocks, S splits):
far more programs than N x G when the tensor is large, and each tile reads memory along
the layout's contiguous axis.

Forward, three launches:
  1. partial statistics: per (split, n, c) the sums of (x - K_nc) and (x - K_nc)^2, with the
     shift K_nc = x[n, c, 0] so the sums do not cancel when |mean| >> std;
  2. a tiny reduction per (n, g): channel means and M2 from the partials, combined over the
     group's channels (Chan et al.) -> mean, rstd (N, G);
  3. normalise + affine + SiLU.
Backward, with dz = dy * silu'(z), z = w xhat + b, g = w dz (per element):
  1. partial per-(n, c) sums of dz * xhat and dz over each split (fp32);
  2. torch sums of the tiny (split, N, C) partials: grad_w, grad_b, and per (n, g)
     A = mean(g), B = mean(g xhat) over the group;
  3. grad_x = rstd (g - A - xhat B).

Launchers take and return what the custom ops in fastdiff/ops/group_norm.py do.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastdiff.triton_kernels._common import dense_affine, empty_in_layout, on_tensor_device, require_layout

TILE_ELEMENTS = 2048
TARGET_PROGRAMS = 1024  # enough to fill 132 SMs several times over


# --------------------------------------------------------------------------- device helpers
@triton.jit
def _tile(x_ptr, n, c_offs, s_offs, C, S, CHANNELS_LAST: tl.constexpr):
    """Pointers and mask of the (BLOCK_C, BLOCK_S) tile of sample n."""
    base = n.to(tl.int64) * C * S
    c2 = c_offs[:, None].to(tl.int64)
    s2 = s_offs[None, :].to(tl.int64)
    if CHANNELS_LAST:
        ptrs = x_ptr + base + s2 * C + c2
    else:
        ptrs = x_ptr + base + c2 * S + s2
    mask = (c_offs[:, None] < C) & (s_offs[None, :] < S)
    return ptrs, mask


@triton.jit
def _silu_and_grad(z):
    """(silu(z), d silu / dz)."""
    sig = 1.0 / (1.0 + tl.exp(-z))
    return z * sig, sig * (1.0 + z * (1.0 - sig))


# --------------------------------------------------------------------------- forward kernels
@triton.jit
def _partial_stats_kernel(
    x_ptr,            # in,  (N, C, S) NCS- or NSC-dense
    sum_ptr,          # out, (SPLITS, N, C) fp32/fp64: sum of (x - K)
    sumsq_ptr,        # out, (SPLITS, N, C): sum of (x - K)^2
    C, S, c_blocks, s_per_split,
    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = pid // c_blocks
    c_offs = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    zero_s = tl.zeros((1,), dtype=tl.int32)
    shift_ptrs, shift_mask = _tile(x_ptr, n, c_offs, zero_s, C, S, CHANNELS_LAST)
    shift = tl.load(shift_ptrs, mask=shift_mask, other=0.0).to(ACC)  # (BLOCK_C, 1): K_nc = x[n, c, 0]
    acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    acc_sq = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    s_begin = split * s_per_split
    for s0 in range(s_begin, tl.minimum(s_begin + s_per_split, S), BLOCK_S):
        s_offs = s0 + tl.arange(0, BLOCK_S)
        ptrs, mask = _tile(x_ptr, n, c_offs, s_offs, C, S, CHANNELS_LAST)
        d = tl.where(mask, tl.load(ptrs, mask=mask, other=0.0).to(ACC) - shift, 0.0)
        acc += d
        acc_sq += d * d
    out = (split * (C * (tl.num_programs(0) // c_blocks)) + n * C).to(tl.int64) + c_offs
    tl.store(sum_ptr + out, tl.sum(acc, axis=1), mask=c_offs < C)
    tl.store(sumsq_ptr + out, tl.sum(acc_sq, axis=1), mask=c_offs < C)


@triton.jit
def _finalize_stats_kernel(
    x_ptr,            # in,  (N, C, S): the shifts x[n, c, 0]
    sum_ptr,          # in,  (SPLITS, N, C)
    sumsq_ptr,        # in,  (SPLITS, N, C)
    mean_ptr,         # out, (N, G)
    rstd_ptr,         # out, (N, G)
    N, C, S, G, splits, eps,
    count,            # S as a float (an int argument may be specialised to a Python constant)
    CHANNELS_LAST: tl.constexpr, BLOCK_CG: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)  # n * G + g
    n = pid // G
    g = pid % G
    cg = C // G
    lanes = tl.arange(0, BLOCK_CG)
    c_offs = g * cg + lanes
    lane_mask = lanes < cg
    base = n.to(tl.int64) * C * S
    if CHANNELS_LAST:
        shift = tl.load(x_ptr + base + c_offs, mask=lane_mask, other=0.0).to(ACC)
    else:
        shift = tl.load(x_ptr + base + c_offs.to(tl.int64) * S, mask=lane_mask, other=0.0).to(ACC)
    s1 = tl.zeros((BLOCK_CG,), dtype=ACC)
    s2 = tl.zeros((BLOCK_CG,), dtype=ACC)
    for split in range(0, splits):
        off = (split * N + n).to(tl.int64) * C + c_offs
        s1 += tl.load(sum_ptr + off, mask=lane_mask, other=0.0)
        s2 += tl.load(sumsq_ptr + off, mask=lane_mask, other=0.0)
    # count: fp32 scalar, exact for S < 2^24; fp64 sums promote it
    channel_mean = shift + s1 / count
    channel_m2 = tl.maximum(s2 - s1 * s1 / count, 0.0)
    group_mean = tl.sum(tl.where(lane_mask, channel_mean, 0.0), axis=0) / cg
    dev = tl.where(lane_mask, channel_mean - group_mean, 0.0)
    # Chan et al.: M2 of the union = sum of M2s + count * sum of squared mean offsets
    m2 = tl.sum(tl.where(lane_mask, channel_m2, 0.0), axis=0) + count * tl.sum(dev * dev, axis=0)
    var = m2 / (count * cg)
    tl.store(mean_ptr + pid, group_mean)
    tl.store(rstd_ptr + pid, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _normalize_kernel(
    x_ptr,            # in,  (N, C, S)
    w_ptr, b_ptr,     # in,  (C,)
    mean_ptr,         # in,  (N, G)
    rstd_ptr,         # in,  (N, G)
    y_ptr,            # out, (N, C, S), x's layout and dtype
    C, S, G, c_blocks, s_per_split,
    ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = pid // c_blocks
    c_offs = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    group = n * G + c_offs // (C // G)
    rstd = tl.load(rstd_ptr + group, mask=c_mask, other=0.0).to(ACC)
    w = tl.load(w_ptr + c_offs, mask=c_mask, other=0.0).to(ACC)
    b = tl.load(b_ptr + c_offs, mask=c_mask, other=0.0).to(ACC)
    # z = w (x - mean) rstd + b = scale x + offset, per channel
    scale = (w * rstd)[:, None]
    offset = (b - tl.load(mean_ptr + group, mask=c_mask, other=0.0).to(ACC) * w * rstd)[:, None]
    s_begin = split * s_per_split
    for s0 in range(s_begin, tl.minimum(s_begin + s_per_split, S), BLOCK_S):
        s_offs = s0 + tl.arange(0, BLOCK_S)
        ptrs, mask = _tile(x_ptr, n, c_offs, s_offs, C, S, CHANNELS_LAST)
        z = tl.load(ptrs, mask=mask, other=0.0).to(ACC) * scale + offset
        if ACT:
            z, _ = _silu_and_grad(z)
        out_ptrs, _ = _tile(y_ptr, n, c_offs, s_offs, C, S, CHANNELS_LAST)
        tl.store(out_ptrs, z.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- backward kernels
@triton.jit
def _bwd_partial_kernel(
    grad_y_ptr,       # in,  (N, C, S), x's layout
    x_ptr,            # in,  (N, C, S)
    w_ptr, b_ptr,     # in,  (C,)
    mean_ptr,         # in,  (N, G)
    rstd_ptr,         # in,  (N, G)
    dsum_ptr,         # out, (SPLITS, N, C): sum of dz * xhat
    dbias_ptr,        # out, (SPLITS, N, C): sum of dz
    C, S, G, c_blocks, s_per_split,
    ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = pid // c_blocks
    c_offs = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    group = n * G + c_offs // (C // G)
    mean = tl.load(mean_ptr + group, mask=c_mask, other=0.0).to(ACC)[:, None]
    rstd = tl.load(rstd_ptr + group, mask=c_mask, other=0.0).to(ACC)[:, None]
    w = tl.load(w_ptr + c_offs, mask=c_mask, other=0.0).to(ACC)[:, None]
    b = tl.load(b_ptr + c_offs, mask=c_mask, other=0.0).to(ACC)[:, None]
    acc_dx = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    acc_d = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    s_begin = split * s_per_split
    for s0 in range(s_begin, tl.minimum(s_begin + s_per_split, S), BLOCK_S):
        s_offs = s0 + tl.arange(0, BLOCK_S)
        ptrs, mask = _tile(x_ptr, n, c_offs, s_offs, C, S, CHANNELS_LAST)
        gptrs, _ = _tile(grad_y_ptr, n, c_offs, s_offs, C, S, CHANNELS_LAST)
        xhat = (tl.load(ptrs, mask=mask, other=0.0).to(ACC) - mean) * rstd
        dz = tl.load(gptrs, mask=mask, other=0.0).to(ACC)
        if ACT:
            _, dsilu = _silu_and_grad(w * xhat + b)
            dz = dz * dsilu
        dz = tl.where(mask, dz, 0.0)
        acc_dx += dz * xhat
        acc_d += dz
    out = (split * (C * (tl.num_programs(0) // c_blocks)) + n * C).to(tl.int64) + c_offs
    tl.store(dsum_ptr + out, tl.sum(acc_dx, axis=1), mask=c_mask)
    tl.store(dbias_ptr + out, tl.sum(acc_d, axis=1), mask=c_mask)


@triton.jit
def _bwd_dx_kernel(
    grad_y_ptr,       # in,  (N, C, S), x's layout
    x_ptr,            # in,  (N, C, S)
    w_ptr, b_ptr,     # in,  (C,)
    mean_ptr,         # in,  (N, G)
    rstd_ptr,         # in,  (N, G)
    a_ptr,            # in,  (N, G): mean of g = w dz over the group
    bcoef_ptr,        # in,  (N, G): mean of g * xhat over the group
    grad_x_ptr,       # out, (N, C, S), x's layout and dtype
    C, S, G, c_blocks, s_per_split,
    ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = pid // c_blocks
    c_offs = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    group = n * G + c_offs // (C // G)
    mean = tl.load(mean_ptr + group, mask=c_mask, other=0.0).to(ACC)[:, None]
    rstd = tl.load(rstd_ptr + group, mask=c_mask, other=0.0).to(ACC)[:, None]
    a = tl.load(a_ptr + group, mask=c_mask, other=0.0).to(ACC)[:, None]
    bc = tl.load(bcoef_ptr + group, mask=c_mask, other=0.0).to(ACC)[:, None]
    w = tl.load(w_ptr + c_offs, mask=c_mask, other=0.0).to(ACC)[:, None]
    b = tl.load(b_ptr + c_offs, mask=c_mask, other=0.0).to(ACC)[:, None]
    s_begin = split * s_per_split
    for s0 in range(s_begin, tl.minimum(s_begin + s_per_split, S), BLOCK_S):
        s_offs = s0 + tl.arange(0, BLOCK_S)
        ptrs, mask = _tile(x_ptr, n, c_offs, s_offs, C, S, CHANNELS_LAST)
        gptrs, _ = _tile(grad_y_ptr, n, c_offs, s_offs, C, S, CHANNELS_LAST)
        xhat = (tl.load(ptrs, mask=mask, other=0.0).to(ACC) - mean) * rstd
        dz = tl.load(gptrs, mask=mask, other=0.0).to(ACC)
        if ACT:
            _, dsilu = _silu_and_grad(w * xhat + b)
            dz = dz * dsilu
        grad_x = rstd * (w * dz - a - xhat * bc)
        out_ptrs, _ = _tile(grad_x_ptr, n, c_offs, s_offs, C, S, CHANNELS_LAST)
        tl.store(out_ptrs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- host side
def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def tile_config(n: int, c: int, s: int, channels_last: bool, tile_elements: int = TILE_ELEMENTS,
                target_programs: int = TARGET_PROGRAMS):
    """(BLOCK_C, BLOCK_S, channel blocks, splits, positions per split) for an (n, c, s) tensor."""
    if channels_last:  # channels contiguous: wide in C
        block_c = min(triton.next_power_of_2(c), 64)
        block_s = max(1, min(triton.next_power_of_2(s), tile_elements // block_c))
    else:  # positions contiguous: wide in S
        block_s = min(triton.next_power_of_2(s), 512)
        block_c = max(1, min(triton.next_power_of_2(c), tile_elements // block_s))
    c_blocks = triton.cdiv(c, block_c)
    s_blocks = triton.cdiv(s, block_s)
    splits = max(1, min(s_blocks, triton.cdiv(target_programs, n * c_blocks)))
    s_per_split = triton.cdiv(s_blocks, splits) * block_s
    splits = triton.cdiv(s, s_per_split)
    return block_c, block_s, c_blocks, splits, s_per_split


@on_tensor_device
def group_norm_silu_fwd_triton(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                               num_groups: int, eps: float, act: bool, *, tile_elements: int = TILE_ELEMENTS,
                               target_programs: int = TARGET_PROGRAMS
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (N, C, S) NCS- or NSC-dense. Returns y (x's layout and dtype), mean and rstd (N, G)
    (fp32; fp64 for fp64 x), as `fastdiff::group_norm_silu_fwd`."""
    n, c, s = x.shape
    channels_last = require_layout(x)
    acc_tl, acc_torch = _acc_dtype(x.dtype)
    block_c, block_s, c_blocks, splits, s_per_split = tile_config(n, c, s, channels_last, tile_elements,
                                                                  target_programs)
    part_sum = torch.empty((splits, n, c), dtype=acc_torch, device=x.device)
    part_sq = torch.empty_like(part_sum)
    mean = torch.empty((n, num_groups), dtype=acc_torch, device=x.device)
    rstd = torch.empty_like(mean)
    y = empty_in_layout(x)
    grid = (n * c_blocks, splits)
    _partial_stats_kernel[grid](x, part_sum, part_sq, c, s, c_blocks, s_per_split, CHANNELS_LAST=channels_last,
                                BLOCK_C=block_c, BLOCK_S=block_s, ACC=acc_tl, num_warps=4)
    _finalize_stats_kernel[(n * num_groups,)](x, part_sum, part_sq, mean, rstd, n, c, s, num_groups, splits,
                                              float(eps), float(s), CHANNELS_LAST=channels_last,
                                              BLOCK_CG=triton.next_power_of_2(c // num_groups), ACC=acc_tl,
                                              num_warps=1)
    w = dense_affine(weight, c, 1.0, x, acc_torch)
    b = dense_affine(bias, c, 0.0, x, acc_torch)
    _normalize_kernel[grid](x, w, b, mean, rstd, y, c, s, num_groups, c_blocks, s_per_split, ACT=bool(act),
                            CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_S=block_s, ACC=acc_tl,
                            num_warps=4)
    return y, mean, rstd


@on_tensor_device
def group_norm_silu_bwd_triton(grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                               bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                               num_groups: int, eps: float, act: bool, *, tile_elements: int = TILE_ELEMENTS,
                               target_programs: int = TARGET_PROGRAMS
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_x in x's layout, grad_weight (C,), grad_bias (C,)) (fp32; fp64 for fp64 x),
    as `fastdiff::group_norm_silu_bwd`."""
    n, c, s = x.shape
    channels_last = require_layout(x)
    acc_tl, acc_torch = _acc_dtype(x.dtype)
    grad_y = grad_y.to(x.dtype)
    if channels_last:
        grad_y = grad_y.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        grad_y = grad_y.contiguous()
    block_c, block_s, c_blocks, splits, s_per_split = tile_config(n, c, s, channels_last, tile_elements,
                                                                  target_programs)
    w = dense_affine(weight, c, 1.0, x, acc_torch)
    b = dense_affine(bias, c, 0.0, x, acc_torch)
    mean = mean.to(acc_torch).contiguous()
    rstd = rstd.to(acc_torch).contiguous()
    dsum = torch.empty((splits, n, c), dtype=acc_torch, device=x.device)
    dbias = torch.empty_like(dsum)
    grid = (n * c_blocks, splits)
    _bwd_partial_kernel[grid](grad_y, x, w, b, mean, rstd, dsum, dbias, c, s, num_groups, c_blocks, s_per_split,
                              ACT=bool(act), CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_S=block_s,
                              ACC=acc_tl, num_warps=4)
    # The tiny second reduction: (splits, N, C) -> per channel and per (n, g).
    ds_nc = dsum.sum(0)        # (N, C): sum_s dz * xhat
    db_nc = dbias.sum(0)       # (N, C): sum_s dz
    grad_w = ds_nc.sum(0)
    grad_b = db_nc.sum(0)
    group_size = (c // num_groups) * s
    a = (db_nc * w).view(n, num_groups, -1).sum(-1) / group_size         # mean_j(g)
    bcoef = (ds_nc * w).view(n, num_groups, -1).sum(-1) / group_size     # mean_j(g * xhat)
    grad_x = empty_in_layout(x)
    _bwd_dx_kernel[grid](grad_y, x, w, b, mean, rstd, a.contiguous(), bcoef.contiguous(), grad_x, c, s, num_groups,
                         c_blocks, s_per_split, ACT=bool(act), CHANNELS_LAST=channels_last, BLOCK_C=block_c,
                         BLOCK_S=block_s, ACC=acc_tl, num_warps=4)
    return grad_x, grad_w, grad_b
