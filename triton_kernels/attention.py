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

from fastdiff.triton_kernels._common import dense_head_dim, head_strides

_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)  # kernels may only read constexpr globals
LN2 = tl.constexpr(0.6931471805599453)


def _block_sizes(d_pad: int) -> Tuple[int, int]:
    if d_pad <= 64:
        return 64, 64
    if d_pad <= 128:
        return 64, 32
    return 32, 32


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
    m_block = tl.program_id(0)
    bh = tl.program_id(1)
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
    m_block = tl.program_id(0)
    bh = tl.program_id(1)
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
    n_block = tl.program_id(0)
    bh = tl.program_id(1)
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
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
        p = tl.exp2(s - (lse * LOG2E)[:, None])
        p = tl.where(row_valid[:, None] & key_valid[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
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
    m_block = tl.program_id(0)
    bh = tl.program_id(1)
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


def attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         block_m: int = 0, block_n: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns out (B, H, Lq, D) contiguous in q's dtype and lse (B, H, Lq) fp32, as
    `fastdiff::attention_fwd`."""
    _check_dtype(q)
    q, k, v = dense_head_dim(q), dense_head_dim(k), dense_head_dim(v)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    d_pad = max(16, triton.next_power_of_2(d))
    bm, bn = _block_sizes(d_pad)
    bm, bn = block_m or bm, block_n or bn
    out = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    _attn_fwd_kernel[(triton.cdiv(lq, bm), b * h)](
        q, k, v, out, lse, *_strides(q, k, v), h, lq, lk, d, float(scale) * _LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, D_PAD=d_pad, PRECISION=_precision(q.dtype), num_warps=4 if d_pad <= 64 else 8)
    return out, lse


def attention_bwd_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, scale: float, block_m: int = 0,
                         block_n: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_q, grad_k, grad_v), contiguous, in q's dtype, as `fastdiff::attention_bwd`."""
    _check_dtype(q)
    q, k, v = dense_head_dim(q), dense_head_dim(k), dense_head_dim(v)
    grad_out = grad_out.to(q.dtype).contiguous()
    out = out.contiguous()
    lse = lse.to(torch.float32).contiguous()
    b, h, lq, d = q.shape
    lk = k.shape[2]
    d_pad = max(16, triton.next_power_of_2(d))
    bm, bn = _block_sizes(d_pad)
    if d_pad > 64:
        bm, bn = 32, 32  # the backward holds twice the tiles of the forward
    bm, bn = block_m or bm, block_n or bn
    delta = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(lq, bm), b * h)](out, grad_out, delta, lq, d, BLOCK_M=bm, D_PAD=d_pad)
    grad_q = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    grad_k = torch.empty((b, h, lk, d), dtype=q.dtype, device=q.device)
    grad_v = torch.empty((b, h, lk, d), dtype=q.dtype, device=q.device)
    strides = _strides(q, k, v)
    common = dict(BLOCK_M=bm, BLOCK_N=bn, D_PAD=d_pad, PRECISION=_precision(q.dtype),
                  num_warps=4 if d_pad <= 64 else 8)
    _attn_bwd_dkdv_kernel[(triton.cdiv(lk, bn), b * h)](
        q, k, v, grad_out, lse, delta, grad_k, grad_v, *strides, h, lq, lk, d, float(scale),
        float(scale) * _LOG2E, **common)
    _attn_bwd_dq_kernel[(triton.cdiv(lq, bm), b * h)](
        q, k, v, grad_out, lse, delta, grad_q, *strides, h, lq, lk, d, float(scale), float(scale) * _LOG2E,
        **common)
    return grad_q, grad_k, grad_v


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = None) -> torch.Tensor:
    """Convenience: the forward output only (scale defaults to 1/sqrt(D))."""
    return attention_fwd_triton(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)[0]
