"""`fastdiff.ops.group_norm_silu`: GroupNorm, its affine and SiLU in one fused op.

    y = silu(weight_c * (x - mean_ng) / sqrt(var_ng + eps) + bias_c)     (act=True)

Statistics per (sample n, group g) over the group's C/G channels and all spatial
positions (biased variance, as torch.nn.GroupNorm). The native CPU kernel
(csrc/cpu/group_norm_silu.cpp) reads x once for the statistics, once for the output, and
its backward recomputes the normalised values from x and the saved (mean, rstd).

Layout: the op sees x as (N, C, S), S the product of the spatial sizes; it accepts NCS
dense input (torch's contiguous NCHW) and NSC dense input (channels_last) as they are,
and returns y in the same layout. Other strides are made contiguous first.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastdiff.ops import _backend
from fastdiff.triton_kernels import cuda_native
from fastdiff.triton_kernels._common import channels_last_3d, dense_affine, empty_in_layout, stats_dtype


# --------------------------------------------------------------------------- checks
def _check_group_norm_inputs(x, num_groups, weight, bias, eps) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, *spatial) with rank >= 2, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__} ({num_groups!r})")
    channels = x.shape[1]
    if num_groups < 1 or channels % num_groups != 0:
        raise ValueError(f"num_groups must be a positive divisor of the channel count C={channels}, "
                         f"got {num_groups}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) (one per channel), got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} dtype must be x's dtype ({x.dtype}) or torch.float32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


# --------------------------------------------------------------------------- reference
def group_norm_silu_reference(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                              bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
                              act: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch ground truth; returns (y, mean, rstd), computed in x's dtype (float64 ok)."""
    n, c = x.shape[0], x.shape[1]
    xg = x.reshape(n, num_groups, -1)
    mean = xg.mean(dim=-1)
    var = (xg - mean.unsqueeze(-1)).square().mean(dim=-1)
    rstd = torch.rsqrt(var + eps)
    xhat = ((xg - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    z = xhat
    if weight is not None:
        z = z * weight.to(x.dtype).reshape(shape)
    if bias is not None:
        z = z + bias.to(x.dtype).reshape(shape)
    y = z * torch.sigmoid(z) if act else z
    return y, mean, rstd


def group_norm_silu_backward_reference(grad_y: torch.Tensor, x: torch.Tensor, num_groups: int,
                                       weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                       mean: torch.Tensor, rstd: torch.Tensor, act: bool = True):
    """Pure-torch backward from the saved (mean, rstd); returns (grad_x, grad_weight, grad_bias).

    With xhat = (x - mean) rstd, z = w xhat + b, y = silu(z):
        dz = dy silu'(z),  grad_bias = sum dz,  grad_weight = sum dz xhat  (over N and space)
        grad_x = rstd (w dz - mean_g(w dz) - xhat mean_g(w dz xhat))
    """
    n, c = x.shape[0], x.shape[1]
    dtype = mean.dtype
    xg = x.to(dtype).reshape(n, num_groups, -1)
    xhat = ((xg - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    w = weight.to(dtype).reshape(shape) if weight is not None else torch.ones(shape, dtype=dtype, device=x.device)
    z = xhat * w + (bias.to(dtype).reshape(shape) if bias is not None else 0.0)
    dy = grad_y.to(dtype)
    if act:
        s = torch.sigmoid(z)
        dz = dy * s * (1.0 + z * (1.0 - s))
    else:
        dz = dy
    reduce_dims = [0] + list(range(2, x.dim()))
    grad_bias = dz.sum(reduce_dims)
    grad_weight = (dz * xhat).sum(reduce_dims)
    dxhat = (dz * w).reshape(n, num_groups, -1)
    xhat_g = xhat.reshape(n, num_groups, -1)
    grad_x = rstd.unsqueeze(-1) * (dxhat - dxhat.mean(-1, keepdim=True)
                                   - xhat_g * (dxhat * xhat_g).mean(-1, keepdim=True))
    return grad_x.reshape(x.shape), grad_weight, grad_bias


# --------------------------------------------------------------------------- kernels
def _reference_fwd(x, weight, bias, num_groups, eps, act):
    y, mean, rstd = group_norm_silu_reference(x, num_groups, weight, bias, eps, act)
    stats = stats_dtype(x.dtype)
    return empty_in_layout(x).copy_(y), mean.to(stats).contiguous(), rstd.to(stats).contiguous()


def _reference_bwd(grad_y, x, weight, bias, mean, rstd, num_groups, eps, act):
    gx, gw, gb = group_norm_silu_backward_reference(grad_y, x, num_groups, weight, bias, mean, rstd, act)
    stats = stats_dtype(x.dtype)
    return empty_in_layout(x).copy_(gx), gw.to(stats).contiguous(), gb.to(stats).contiguous()


def _native_fwd(x, weight, bias, num_groups, eps, act):
    lib = _backend.native_lib
    n, c, s = x.shape
    y = empty_in_layout(x)
    mean = torch.empty((n, num_groups), dtype=torch.float32)
    rstd = torch.empty((n, num_groups), dtype=torch.float32)
    w = dense_affine(weight, c, 1.0, x)
    b = dense_affine(bias, c, 0.0, x)
    lib.group_norm_silu_forward(
        x=x.data_ptr(), weight=w.data_ptr(), bias=b.data_ptr(), y=y.data_ptr(), mean=mean.data_ptr(),
        rstd=rstd.data_ptr(), batch=n, channels=c, spatial=s, groups=num_groups, eps=float(eps),
        channels_last=bool(channels_last_3d(x)), act=act, dtype=_backend.dtype_code(lib, x.dtype),
        num_threads=torch.get_num_threads())
    return y, mean, rstd


def _native_bwd(grad_y, x, weight, bias, mean, rstd, num_groups, eps, act):
    lib = _backend.native_lib
    n, c, s = x.shape
    if channels_last_3d(grad_y) != channels_last_3d(x) or grad_y.dtype != x.dtype:
        grad_y = empty_in_layout(x).copy_(grad_y)  # the kernel reads both in x's layout
    grad_x = empty_in_layout(x)
    grad_w = torch.empty((c,), dtype=torch.float32)
    grad_b = torch.empty((c,), dtype=torch.float32)
    w = dense_affine(weight, c, 1.0, x)
    b = dense_affine(bias, c, 0.0, x)
    lib.group_norm_silu_backward(
        grad_y=grad_y.data_ptr(), x=x.data_ptr(), weight=w.data_ptr(), bias=b.data_ptr(),
        mean=mean.data_ptr(), rstd=rstd.data_ptr(), grad_x=grad_x.data_ptr(), grad_weight=grad_w.data_ptr(),
        grad_bias=grad_b.data_ptr(), batch=n, channels=c, spatial=s, groups=num_groups,
        channels_last=bool(channels_last_3d(x)), act=act, dtype=_backend.dtype_code(lib, x.dtype),
        num_threads=torch.get_num_threads())
    return grad_x, grad_w, grad_b


def _triton_fwd(*args):
    from fastdiff.triton_kernels.group_norm_silu import group_norm_silu_fwd_triton
    return group_norm_silu_fwd_triton(*args)


def _triton_bwd(*args):
    from fastdiff.triton_kernels.group_norm_silu import group_norm_silu_bwd_triton
    return group_norm_silu_bwd_triton(*args)


def _cuda_fwd(x, *args):
    return cuda_native.group_norm_silu_fwd_cuda(x, *args, _lib=_backend.cuda_module_for(x.device))


def _cuda_bwd(grad_y, x, *args):
    return cuda_native.group_norm_silu_bwd_cuda(grad_y, x, *args, _lib=_backend.cuda_module_for(x.device))


TABLE = _backend.register_table(_backend.OpTable(
    "group_norm_silu", auto={"cpu": ("native",), "cuda": ("cuda", "triton")}))
TABLE.register("reference", fwd=_reference_fwd, bwd=_reference_bwd)
TABLE.register("native", devices=("cpu",), dtypes=(torch.float32, torch.bfloat16), fwd=_native_fwd, bwd=_native_bwd)
TABLE.register("triton", devices=("cuda", "cpu"), dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64),
               fwd=_triton_fwd, bwd=_triton_bwd)
# float64 is not a CUDA C++ case (fp32 statistics): refused here, and by the binding
TABLE.register("cuda", devices=("cuda", "cpu"), dtypes=(torch.float32, torch.float16, torch.bfloat16),
               fwd=_cuda_fwd, bwd=_cuda_bwd)


# --------------------------------------------------------------------------- forward op
@torch.library.custom_op("fastdiff::group_norm_silu_fwd", mutates_args=())
def _group_norm_silu_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         num_groups: int, eps: float, act: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (N, C, S), NCS- or NSC-dense. Returns y (x's layout), mean and rstd (N, G)."""
    return TABLE.run("fwd", TABLE.call_for(x), x, weight, bias, num_groups, eps, act)


@_group_norm_silu_fwd.register_fake
def _(x, weight, bias, num_groups, eps, act):
    n = x.shape[0]
    stats = stats_dtype(x.dtype)
    return (empty_in_layout(x), x.new_empty((n, num_groups), dtype=stats),
            x.new_empty((n, num_groups), dtype=stats))


# --------------------------------------------------------------------------- backward op
@torch.library.custom_op("fastdiff::group_norm_silu_bwd", mutates_args=())
def _group_norm_silu_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                         eps: float, act: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_x in x's layout, grad_weight (C,), grad_bias (C,)), the latter two in fp32
    (float64 for float64 x) whether or not the op has an affine."""
    return TABLE.run("bwd", TABLE.call_for(x), grad_y, x, weight, bias, mean, rstd, num_groups, eps, act)


@_group_norm_silu_bwd.register_fake
def _(grad_y, x, weight, bias, mean, rstd, num_groups, eps, act):
    c = x.shape[1]
    stats = stats_dtype(x.dtype)
    return empty_in_layout(x), x.new_empty((c,), dtype=stats), x.new_empty((c,), dtype=stats)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.eps, ctx.act = num_groups, eps, act


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    grad_x, grad_w, grad_b = _group_norm_silu_bwd(grad_y, x, weight, bias, mean, rstd, ctx.num_groups,
                                                  ctx.eps, ctx.act)
    grad_w = grad_w.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    grad_b = grad_b.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b, None, None, None


_group_norm_silu_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def group_norm_silu(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, eps: float = 1e-5, act: bool = True) -> torch.Tensor:
    """silu(group_norm(x, num_groups, weight, bias, eps)), or without the SiLU if act=False.

    x: (N, C, *spatial) — (N, C), (N, C, L), (N, C, H, W), ... — contiguous or
    channels_last; y keeps x's layout and dtype. The kernel is chosen by the op's table
    (fastdiff/ops/_backend.py): native for fp32 and bf16 CPU tensors, CUDA C++ then Triton for
    CUDA tensors, the pure-torch reference for the rest.
    """
    _check_group_norm_inputs(x, num_groups, weight, bias, eps)
    if x.dim() == 2:
        x3 = x.unsqueeze(-1)
    else:
        x3 = x.flatten(2)  # a view for NCHW and channels_last (their spatial dims collapse)
    if channels_last_3d(x3) is None:
        x3 = x3.contiguous()
    y3, _, _ = _group_norm_silu_fwd(x3, weight, bias, num_groups, float(eps), bool(act))
    if x.dim() == 2:
        return y3.squeeze(-1)
    return y3.view(x.shape)
