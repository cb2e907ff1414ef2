"""`fastdiff.ops.attention`: softmax(scale * q k^T) v, flash-style, forward and backward.

Shapes (B, H, L, D): q (B, H, Lq, D), k and v (B, H, Lk, D), out (B, H, Lq, D);
scale defaults to 1/sqrt(D). The native CPU kernel (csrc/cpu/attention.cpp) never forms
the Lq x Lk matrix: it walks key blocks with an online softmax and saves only the
log-sum-exp per query row, from which the backward recomputes the probabilities.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from fastdiff.ops import _backend
from fastdiff.triton_kernels._common import dense_head_dim, head_strides, stats_dtype

MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256


# --------------------------------------------------------------------------- checks
def _check_attention_inputs(q, k, v, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, L, D) (rank 4), got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"k shape {tuple(k.shape)} must equal v shape {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q shape {tuple(q.shape)} and k shape {tuple(k.shape)} must agree in B, H and D "
                         "(only the lengths may differ)")
    head_dim = q.shape[3]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={head_dim} (q.shape[3]) must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite float or None, got {scale!r}")


# --------------------------------------------------------------------------- reference
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch ground truth (forms the full score matrix); returns (out, lse) in q's dtype.

    Computed in fp32 (fp64 for fp64 inputs) with a normalised softmax: probabilities from
    softmax(scores) rather than exp(scores - lse), so that huge logits (all-equal scores of
    2.8e8, where lse = max + log L rounds back to max) and bf16 inputs stay accurate."""
    out, lse = _reference_compute(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    return out, lse.to(q.dtype)


def _reference_compute(q, k, v, scale: float):
    """(out in q's dtype, lse in the compute dtype: fp32, fp64 for fp64 inputs)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (t.to(compute) for t in (q, k, v))
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vc).to(q.dtype), torch.logsumexp(scores, dim=-1)


def attention_backward_reference(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, scale: float):
    """Pure-torch backward from the saved (out, lse); returns (grad_q, grad_k, grad_v).

        P = exp(scale q k^T - lse),  dV = P^T dO,  dP = dO V^T,
        dS = P (dP - rowsum(dO * O)),  dQ = scale dS K,  dK = scale dS^T Q
    """
    dtype = lse.dtype
    q, k, v, out, grad_out = (t.to(dtype) for t in (q, k, v, out, grad_out))
    probs = torch.exp(torch.matmul(q, k.transpose(-1, -2)) * scale - lse.unsqueeze(-1))
    grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
    grad_probs = torch.matmul(grad_out, v.transpose(-1, -2))
    delta = (grad_out * out).sum(-1, keepdim=True)
    grad_scores = probs * (grad_probs - delta)
    grad_q = torch.matmul(grad_scores, k) * scale
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), q) * scale
    return grad_q, grad_k, grad_v


# --------------------------------------------------------------------------- kernels
def _reference_fwd(q, k, v, scale):
    out, lse = _reference_compute(q, k, v, scale)
    return out.contiguous(), lse.to(stats_dtype(q.dtype)).contiguous()


def _reference_bwd(grad_out, q, k, v, out, lse, scale):
    grads = attention_backward_reference(grad_out, q, k, v, out, lse, scale)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v)))


def _native_fwd(q, k, v, scale):
    lib = _backend.native_lib
    q, k, v = dense_head_dim(q), dense_head_dim(k), dense_head_dim(v)
    b, h, lq, d = q.shape
    out = torch.empty((b, h, lq, d), dtype=q.dtype)
    lse = torch.empty((b, h, lq), dtype=torch.float32)
    lib.attention_forward(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(), batch=b,
        heads=h, len_q=lq, len_k=k.shape[2], head_dim=d, q_stride=head_strides(q), k_stride=head_strides(k),
        v_stride=head_strides(v), scale=scale, dtype=_backend.dtype_code(lib, q.dtype),
        num_threads=torch.get_num_threads())
    return out, lse


def _native_bwd(grad_out, q, k, v, out, lse, scale):
    lib = _backend.native_lib
    grad_out = dense_head_dim(grad_out.to(q.dtype))
    q, k, v = dense_head_dim(q), dense_head_dim(k), dense_head_dim(v)
    out = out.contiguous()
    b, h, lq, d = q.shape
    grad_q = torch.empty(q.shape, dtype=q.dtype)
    grad_k = torch.empty(k.shape, dtype=q.dtype)
    grad_v = torch.empty(v.shape, dtype=q.dtype)
    lib.attention_backward(
        grad_out=grad_out.data_ptr(), q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(),
        lse=lse.contiguous().data_ptr(), grad_q=grad_q.data_ptr(), grad_k=grad_k.data_ptr(),
        grad_v=grad_v.data_ptr(), batch=b, heads=h, len_q=lq, len_k=k.shape[2], head_dim=d,
        grad_out_stride=head_strides(grad_out), q_stride=head_strides(q), k_stride=head_strides(k),
        v_stride=head_strides(v), scale=scale, dtype=_backend.dtype_code(lib, q.dtype),
        num_threads=torch.get_num_threads())
    return grad_q, grad_k, grad_v


def _aten_fwd(q, k, v, scale):
    """ATen's CPU flash-attention kernel (blocked, vectorised, bf16 through oneDNN/AMX where the
    CPU has it). It returns the row log-sum-exp in fp32 (fp64 for fp64), as our kernels do.
    It reads a head dim with stride != 1 wrongly (tests/test_attention.py), so that is made dense."""
    q, k, v = dense_head_dim(q), dense_head_dim(k), dense_head_dim(v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    return out.contiguous(), lse.contiguous()


def _aten_bwd(grad_out, q, k, v, out, lse, scale):
    q, k, v, out, grad_out = (dense_head_dim(t) for t in (q, k, v, out, grad_out.to(q.dtype)))
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, False, scale=scale)
    return tuple(g.contiguous() for g in grads)


def _triton_fwd(*args):
    from fastdiff.triton_kernels.attention import attention_fwd_triton
    return attention_fwd_triton(*args)


def _triton_bwd(*args):
    from fastdiff.triton_kernels.attention import attention_bwd_triton
    return attention_bwd_triton(*args)


def _head_dim_limits(call: _backend.Call):
    head_dim = call.facts.get("head_dim")
    if head_dim is not None and not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim} is outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    return None


TABLE = _backend.register_table(_backend.OpTable(
    "attention", auto={"cpu": ("aten", "native"), "cuda": ("triton",)}, facts=lambda q: {"head_dim": q.shape[-1]}))
TABLE.register("reference", fwd=_reference_fwd, bwd=_reference_bwd)
# float64 stays with the reference (the ground truth) under auto
TABLE.register("aten", devices=("cpu",), dtypes=(torch.float32, torch.bfloat16, torch.float16),
               fwd=_aten_fwd, bwd=_aten_bwd)
TABLE.register("native", devices=("cpu",), dtypes=(torch.float32, torch.bfloat16), limits=_head_dim_limits,
               fwd=_native_fwd, bwd=_native_bwd)
# float64 is not a Triton attention case (no fp64 tensor-core dot): auto gives it to the reference
TABLE.register("triton", devices=("cuda", "cpu"), dtypes=(torch.float32, torch.float16, torch.bfloat16),
               limits=_head_dim_limits, fwd=_triton_fwd, bwd=_triton_bwd)


# --------------------------------------------------------------------------- forward op
@torch.library.custom_op("fastdiff::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns out (B, H, Lq, D) contiguous and lse (B, H, Lq) (fp32; float64 for float64 q)."""
    return TABLE.run("fwd", TABLE.call_for(q), q, k, v, scale)


@_attention_fwd.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=stats_dtype(q.dtype))


# --------------------------------------------------------------------------- backward op
@torch.library.custom_op("fastdiff::attention_bwd", mutates_args=())
def _attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_q, grad_k, grad_v), contiguous, in q's dtype."""
    return TABLE.run("bwd", TABLE.call_for(q), grad_out, q, k, v, out, lse, scale)


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = _attention_bwd(grad_out, q, k, v, out, lse, ctx.scale)
    return grad_q, grad_k, grad_v, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale * q k^T) v over the last two dims; q (B, H, Lq, D), k, v (B, H, Lk, D).

    The kernel is chosen by the op's table (fastdiff/ops/_backend.py): on CPU, ATen's flash
    kernel for fp32/bf16/fp16 (measured faster than fastdiff's own native kernel, which stays
    available as `use_backend("native")`), Triton for fp32/fp16/bf16 CUDA tensors, the
    pure-torch reference for the rest.
    Any strides; the kernels read a dense head dim in place.
    """
    _check_attention_inputs(q, k, v, scale)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, _ = _attention_fwd(q, k, v, float(scale))
    return out
