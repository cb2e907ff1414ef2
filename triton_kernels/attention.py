"""Triton flash-style attention: softmax(scale q k^T) v, forward and backward.

q (B, H, Lq, D), k and v (B, H, Lk, D), any strides with a dense head dim; 8 <= D <= 256
(padded to a power of two >= 16 inside the kernels, the pad masked to zero).

Forward: one program per (query block, b * h) walks the key blocks with an online softmax
(running row max m and row sum l, in base 2), never forming the Lq x Lk matrix, and saves
lse = m + log l per query row (natural log, fp32).
Backward (two passes, no atomics, deterministic):
  0. delta_i = sum_d dO_id O_id (one small kernel),
  1. per key block: recompute P = exp(scale q k^T - lse) over all query blocks and
     accumulate dV = P^T dO and dK = scale dS^T q with dS = P (dO v^T - delta),
  2. per query block: dQ = scale dS k over all key blocks.
fp16 / bf16 inputs feed the tensor cores and accumulate in fp32; fp32 inputs use IEEE fp32
products (no TF32), so fp32 results match an fp32 reference. fp64 is not a kernel case: the
op's backend table (fastdiff/ops/attention.py) never sends it here, and the launchers refuse it.

Launchers take and return what the custom ops in fastdiff/ops/attention.py do.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from fastdiff.triton_kernels._common import dense_head_dim, head_strides, on_tensor_device

_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)  # kernels may only read constexpr globals
LN2 = tl.constexpr(0.6931471805599453)


# (BLOCK_M, BLOCK_N, num_warps) per (pass, operand family, padded head dim). Chosen so that each
# kernel compiles for sm_90 without register spills and with at most ~100 KiB of shared memory
# (two blocks per SM), as measured with Triton 3.9's compiler and ptxas -v (aot_check --spills;
# tests/test_triton_kernels.py runs it). The old fixed 64/32 tiles needed 164-200 KiB (fp32,
# D = 256) and spilled 2-12 KiB per thread (fp32 D = 64 forward, every fp32 dK/dV kernel).
# fp32 tiles hold twice the bytes of fp16/bf16 ones and run IEEE fp32 dots (no tensor cores),
# so they are smaller; the backward keeps dK and dV (or dQ) accumulators and so is smaller still.
_TILES = {
    # pass, "fp32" | "half", D_PAD: (BLOCK_M, BLOCK_N, num_warps)
    ("fwd", "half", 64): (64, 64, 4), ("fwd", "half", 128): (64, 32, 4), ("fwd", "half", 256): (32, 32, 4),
    ("bwd", "half", 64): (64, 64, 4), ("bwd", "half", 128): (32, 32, 4), ("bwd", "half", 256): (32, 32, 8),
    ("fwd", "fp32", 64): (32, 32, 4), ("fwd", "fp32", 128): (32, 16, 4), ("fwd", "fp32", 256): (16, 16, 4),
    ("bwd", "fp32", 64): (32, 32, 8), ("bwd", "fp32", 128): (16, 16, 4), ("bwd", "fp32", 256): (16, 16, 4),
}


def tiles(pass_: str, dtype: torch.dtype, d_pad: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for one pass ("fwd" or "bwd"), dtype and padded head dim."""
    family = "fp32" if dtype == torch.float32 else "half"
    return _TILES[(pass_, family, max(64, d_pad))]


# Grid: axis 0 is (batch * head) (up to 2^31 - 1 programs), axis 1 the row blocks of one head
# (up to 65,535: L up to a million rows even with 16-row blocks). Axis 1 or 2 holding B * H
# would cap it at 65,535.
_MAX_GRID_Y = 65535


def grid(rows: int, block: int, batch_heads: int) -> Tuple[int, int]:
    blocks = triton.cdiv(rows, block)
    if blocks > _MAX_GRID_Y:
        raise ValueError(f"sequence length {rows} needs {blocks} blocks of {block} rows; at most {_MAX_GRID_Y}")
    return batch_heads, blocks


@triton.jit
def _load_rows(ptr, row0, rows, stride_l, d_offs, D, L):
    """(BLOCK, D_PAD) tile of rows row0.. of one (L, D) matrix with row stride stride_l, zero-padded."""
    r = row0 + tl.arange(0, rows)
    mask = (r[:, None] < L) & (d_offs[None, :] < D)
    return tl.load(ptr + r[:, None].to(tl.int64) * stride_l + d_offs[None, :], mask=mask, other=0.0)


@triton.jit
def _attn_fwd_kernel(
    q_ptr,            # in,  (B, H, Lq, D) strides sqb, sqh, sql, 1
    k_ptr,            # in,  (B, H, Lk, D) strides skb, skh, skl, 1
    v_ptr,            # in,  (B, H, Lk, D) strides svb, svh, svl, 1
    out_ptr,          # out, (B, H, Lq, D) contiguous, q's dtype
    lse_ptr,          # out, (B, H, Lq) contiguous fp32
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
    H, Lq, Lk, D, qk_scale_log2,  # scale * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    m_block = tl.program_id(1)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    d_offs = tl.arange(0, D_PAD)
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    row0 = m_block * BLOCK_M
    q = _load_rows(q_base, row0, BLOCK_M, sql, d_offs, D, Lq)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        k = _load_rows(k_base, n0, BLOCK_N, skl, d_offs, D, Lk)
        v = _load_rows(v_base, n0, BLOCK_N, svl, d_offs, D, Lk)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2  # (BLOCK_M, BLOCK_N), base 2
        key_valid = (n0 + tl.arange(0, BLOCK_N)) < Lk
        s = tl.where(key_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < Lq
    o_ptrs = out_ptr + (bh.to(tl.int64) * Lq + rows[:, None]) * D + d_offs[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & (d_offs[None, :] < D))
    tl.store(lse_ptr + bh.to(tl.int64) * Lq + rows, (m_i + tl.log2(l_i)) * LN2, mask=row_mask)


@triton.jit
def _attn_bwd_delta_kernel(
    out_ptr,          # in,  (B*H, Lq, D) contiguous
    grad_out_ptr,     # in,  (B*H, Lq, D) contiguous
    delta_ptr,        # out, (B*H, Lq) fp32: rowsum(dO * O)
    Lq, D,
    BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    m_block = tl.program_id(1)
    bh = tl.program_id(0)
    d_offs = tl.arange(0, D_PAD)
    base = bh.to(tl.int64) * Lq * D
    o = _load_rows(out_ptr + base, m_block * BLOCK_M, BLOCK_M, D, d_offs, D, Lq).to(tl.float32)
    do = _load_rows(grad_out_ptr + base, m_block * BLOCK_M, BLOCK_M, D, d_offs, D, Lq).to(tl.float32)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(delta_ptr + bh.to(tl.int64) * Lq + rows, tl.sum(o * do, axis=1), mask=rows < Lq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr,  # in, as in the forward (strides below)
    grad_out_ptr,     # in,  (B*H, Lq, D) contiguous
    lse_ptr,          # in,  (B*H, Lq) fp32
    delta_ptr,        # in,  (B*H, Lq) fp32
    grad_k_ptr,       # out, (B*H, Lk, D) contiguous
    grad_v_ptr,       # out, (B*H, Lk, D) contiguous
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
    H, Lq, Lk, D, scale, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    n_block = tl.program_id(1)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    d_offs = tl.arange(0, D_PAD)
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    do_base = grad_out_ptr + bh.to(tl.int64) * Lq * D
    col0 = n_block * BLOCK_N
    k = _load_rows(k_base, col0, BLOCK_N, skl, d_offs, D, Lk)
    v = _load_rows(v_base, col0, BLOCK_N, svl, d_offs, D, Lk)
    key_valid = (col0 + tl.arange(0, BLOCK_N)) < Lk
    dk = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    for m0 in range(0, Lq, BLOCK_M):
        q = _load_rows(q_base, m0, BLOCK_M, sql, d_offs, D, Lq)
        do = _load_rows(do_base, m0, BLOCK_M, D, d_offs, D, Lq)
        rows = m0 + tl.arange(0, BLOCK_M)
        row_valid = rows < Lq
        lse = tl.load(lse_ptr + bh.to(tl.int64) * Lq + rows, mask=row_valid, other=0.0)
        delta = tl.load(delta_ptr + bh.to(tl.int64) * Lq + rows, mask=row_valid, other=0.0)
        # Transposed scores S^T = k q^T (BLOCK_N, BLOCK_M): P^T and dS^T come out in the layout the
        # dK, dV products consume, with no transpose of a computed tile (which spilled in fp32).
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale_log2
        pt = tl.exp2(st - (lse * LOG2E)[None, :])
        pt = tl.where(key_valid[:, None] & row_valid[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    cols = col0 + tl.arange(0, BLOCK_N)
    out_off = (bh.to(tl.int64) * Lk + cols[:, None]) * D + d_offs[None, :]
    mask = key_valid[:, None] & (d_offs[None, :] < D)
    tl.store(grad_k_ptr + out_off, (dk * scale).to(grad_k_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_v_ptr + out_off, dv.to(grad_v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr,  # in, as in the forward
    grad_out_ptr,     # in,  (B*H, Lq, D) contiguous
    lse_ptr,          # in,  (B*H, Lq) fp32
    delta_ptr,        # in,  (B*H, Lq) fp32
    grad_q_ptr,       # out, (B*H, Lq, D) contiguous
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
    H, Lq, Lk, D, scale, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    m_block = tl.program_id(1)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    d_offs = tl.arange(0, D_PAD)
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    row0 = m_block * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_valid = rows < Lq
    q = _load_rows(q_base, row0, BLOCK_M, sql, d_offs, D, Lq)
    do = _load_rows(grad_out_ptr + bh.to(tl.int64) * Lq * D, row0, BLOCK_M, D, d_offs, D, Lq)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * Lq + rows, mask=row_valid, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * Lq + rows, mask=row_valid, other=0.0)
    dq = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        k = _load_rows(k_base, n0, BLOCK_N, skl, d_offs, D, Lk)
        v = _load_rows(v_base, n0, BLOCK_N, svl, d_offs, D, Lk)
        key_valid = (n0 + tl.arange(0, BLOCK_N)) < Lk
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
        p = tl.exp2(s - (lse * LOG2E)[:, None])
        p = tl.where(row_valid[:, None] & key_valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    out_off = (bh.to(tl.int64) * Lq + rows[:, None]) * D + d_offs[None, :]
    tl.store(grad_q_ptr + out_off, (dq * scale).to(grad_q_ptr.dtype.element_ty),
             mask=row_valid[:, None] & (d_offs[None, :] < D))


# --------------------------------------------------------------------------- host side
def _strides(*ts):
    return [s for t in ts for s in head_strides(t)]


def _check_dtype(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"Triton attention runs fp32, fp16 and bf16, got {q.dtype}")


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for fp16/bf16 operands


@on_tensor_device
def attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         block_m: int = 0, block_n: int = 0, num_warps: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns out (B, H, Lq, D) contiguous in q's dtype and lse (B, H, Lq) fp32, as
    `fastdiff::attention_fwd`."""
    _check_dtype(q)
    q, k, v = dense_head_dim(q), dense_head_dim(k), dense_head_dim(v)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    d_pad = max(16, triton.next_power_of_2(d))
    bm, bn, warps = tiles("fwd", q.dtype, d_pad)
    bm, bn, warps = block_m or bm, block_n or bn, num_warps or warps
    out = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    _attn_fwd_kernel[grid(lq, bm, b * h)](
        q, k, v, out, lse, *_strides(q, k, v), h, lq, lk, d, float(scale) * _LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, D_PAD=d_pad, PRECISION=_precision(q.dtype), num_warps=warps)
    return out, lse


@on_tensor_device
def attention_bwd_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, scale: float, block_m: int = 0,
                         block_n: int = 0, num_warps: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_q, grad_k, grad_v), contiguous, in q's dtype, as `fastdiff::attention_bwd`."""
    _check_dtype(q)
    q, k, v = dense_head_dim(q), dense_head_dim(k), dense_head_dim(v)
    grad_out = grad_out.to(q.dtype).contiguous()
    out = out.contiguous()
    lse = lse.to(torch.float32).contiguous()
    b, h, lq, d = q.shape
    lk = k.shape[2]
    d_pad = max(16, triton.next_power_of_2(d))
    bm, bn, warps = tiles("bwd", q.dtype, d_pad)
    bm, bn, warps = block_m or bm, block_n or bn, num_warps or warps
    delta = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[grid(lq, bm, b * h)](out, grad_out, delta, lq, d, BLOCK_M=bm, D_PAD=d_pad)
    grad_q = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    grad_k = torch.empty((b, h, lk, d), dtype=q.dtype, device=q.device)
    grad_v = torch.empty((b, h, lk, d), dtype=q.dtype, device=q.device)
    strides = _strides(q, k, v)
    common = dict(BLOCK_M=bm, BLOCK_N=bn, D_PAD=d_pad, PRECISION=_precision(q.dtype), num_warps=warps)
    _attn_bwd_dkdv_kernel[grid(lk, bn, b * h)](
        q, k, v, grad_out, lse, delta, grad_k, grad_v, *strides, h, lq, lk, d, float(scale),
        float(scale) * _LOG2E, **common)
    _attn_bwd_dq_kernel[grid(lq, bm, b * h)](
        q, k, v, grad_out, lse, delta, grad_q, *strides, h, lq, lk, d, float(scale), float(scale) * _LOG2E,
        **common)
    return grad_q, grad_k, grad_v


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = None) -> torch.Tensor:
    """Convenience: the forward output only (scale defaults to 1/sqrt(D))."""
    return attention_fwd_triton(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)[0]
