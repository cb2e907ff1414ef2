"""Python side of the CUDA C++ kernels (module fastdiff._C_cuda, csrc/cuda/).

The same launcher signatures as the Triton kernels (triton_kernels/sampler_step.py and
group_norm_silu.py), so tests and benchmarks can swap one for the other. Inputs are
assumed checked by the custom ops; these functions make them dense, allocate outputs and
workspaces on the tensors' device, and pass raw pointers and torch's current stream.

`available()` says whether the module was built (a CUDA toolkit at build time) and a GPU
is visible. Every launcher takes `_lib=`: tests pass a host-emulated build of the same
kernels (csrc/cuda/host_emulation.h) and CPU tensors.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from fastdiff.triton_kernels._common import (dense_affine, device_guard, empty_in_layout, on_tensor_device,
                                             require_layout)

try:
    from fastdiff import _C_cuda as lib  # type: ignore[attr-defined]
except ImportError:  # built without a CUDA toolkit (FASTDIFF_CUDA=OFF or none found)
    lib = None

_MASK32 = 0xFFFFFFFF


def built() -> bool:
    return lib is not None


def available() -> bool:
    return lib is not None and torch.cuda.is_available()


def _storage(dtype: torch.dtype, mod, allowed=(torch.float32, torch.float16, torch.bfloat16, torch.float64)) -> int:
    """The module's code for `dtype` (csrc/dtypes.h, the one table every kernel uses)."""
    if dtype not in allowed:
        raise TypeError(f"these CUDA kernels store {', '.join(str(d) for d in allowed)}, got {dtype}")
    return mod.dtype_codes[str(dtype).replace("torch.", "")]


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def _module(_lib, *tensors: torch.Tensor):
    """The kernel module to call: `_lib` (host emulation, CPU tensors) or fastdiff._C_cuda."""
    if _lib is not None:
        return _lib
    _check_cuda(*tensors)
    return lib


def _check_cuda(*tensors: torch.Tensor) -> None:
    if lib is None:
        raise RuntimeError("fastdiff._C_cuda is not built (install with a CUDA toolkit, FASTDIFF_CUDA=AUTO|ON)")
    for t in tensors:
        if t.device.type != "cuda":
            raise ValueError(f"the CUDA kernels need CUDA tensors, got one on {t.device}")


# --------------------------------------------------------------------------- sampler_step
def _step(x_t, model_output, coefs, coef_table, step_index, seed, step, sample_offset, clip, mode, _lib):
    mod = _module(_lib, x_t, model_output)
    x = x_t.contiguous()
    out = model_output.contiguous()
    batch = x.shape[0]
    numel = x[0].numel() if batch else 0
    y = torch.empty_like(x)
    a1, a2, c1, c2, sigma, min_log, max_log = [float(c) for c in coefs]
    mod.sampler_step(x=x.data_ptr(), model_output=out.data_ptr(), y=y.data_ptr(),
                     coef_table=coef_table.data_ptr() if coef_table is not None else 0,
                     step_index=step_index.data_ptr() if step_index is not None else 0,
                     table_rows=coef_table.shape[0] if coef_table is not None else 0, batch=batch, numel=numel,
                     out_stride=out[0].numel() if batch else 0, a1=a1, a2=a2, c1=c1, c2=c2, sigma=sigma,
                     min_log=min_log, max_log=max_log, seed=int(seed), step=int(step) & _MASK32,
                     sample_offset=int(sample_offset), clip=bool(clip), variance_mode=int(mode),
                     storage=_storage(x.dtype, mod), stream=_stream(x))
    return y


@on_tensor_device
def sampler_step_cuda(x_t: torch.Tensor, model_output: torch.Tensor, coefs: Sequence[float], seed: int, step: int,
                      sample_offset: int, clip_denoised: bool, variance_mode: int, *, _lib=None) -> torch.Tensor:
    """As `fastdiff::sampler_step` (and `sampler_step_triton`)."""
    return _step(x_t, model_output, coefs, None, None, seed, step, sample_offset, clip_denoised, variance_mode, _lib)


@on_tensor_device
def sampler_step_table_cuda(x_t: torch.Tensor, model_output: torch.Tensor, coef_table: torch.Tensor,
                            step_index: torch.Tensor, seed: int, sample_offset: int, clip_denoised: bool,
                            variance_mode: int, *, _lib=None) -> torch.Tensor:
    """As `fastdiff::sampler_step_table`: coefficients and Philox step read on the device."""
    _module(_lib, coef_table, step_index)
    return _step(x_t, model_output, (0.0,) * 7, coef_table.to(torch.float64).contiguous(), step_index, seed, 0,
                 sample_offset, clip_denoised, variance_mode, _lib)


def randn_cuda(shape: Tuple[int, ...], seed: int, step: int, sample_offset: int = 0,
               dtype: torch.dtype = torch.float32, device="cuda", *, _lib=None) -> torch.Tensor:
    y = torch.empty(tuple(shape), dtype=dtype, device=device)
    mod = _module(_lib, y)
    batch = y.shape[0] if y.dim() else 0
    if y.numel():
        with device_guard(y):
            mod.philox_normal(y=y.data_ptr(), batch=batch, numel=y[0].numel(), seed=int(seed),
                              step=int(step) & _MASK32,
                              sample_offset=int(sample_offset), storage=_storage(dtype, mod), stream=_stream(y))
    return y


# --------------------------------------------------------------------------- group_norm_silu
_GN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # fp32 statistics: no float64 kernel


@on_tensor_device
def group_norm_silu_fwd_cuda(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                             num_groups: int, eps: float, act: bool, *, _lib=None
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `fastdiff::group_norm_silu_fwd` for fp32 / fp16 / bf16 x (N, C, S)."""
    mod = _module(_lib, x)
    n, c, s = x.shape
    channels_last = require_layout(x)
    storage = _storage(x.dtype, mod, _GN_DTYPES)
    splits = mod.group_norm_splits(n, c, s, channels_last)
    workspace = torch.empty((2 * splits * n * c,), dtype=torch.float32, device=x.device)
    mean = torch.empty((n, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    y = empty_in_layout(x)
    w, b = dense_affine(weight, c, 1.0, x), dense_affine(bias, c, 0.0, x)
    mod.group_norm_silu_forward(x=x.data_ptr(), weight=w.data_ptr(), bias=b.data_ptr(), y=y.data_ptr(),
                                mean=mean.data_ptr(), rstd=rstd.data_ptr(), workspace=workspace.data_ptr(), n=n, c=c,
                                s=s, groups=num_groups, splits=splits, eps=float(eps), channels_last=channels_last,
                                act=bool(act), storage=storage, stream=_stream(x))
    return y, mean, rstd


@on_tensor_device
def group_norm_silu_bwd_cuda(grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                             eps: float, act: bool, *, _lib=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `fastdiff::group_norm_silu_bwd`: (grad_x in x's layout, grad_weight, grad_bias fp32)."""
    mod = _module(_lib, x, grad_y)
    n, c, s = x.shape
    channels_last = require_layout(x)
    storage = _storage(x.dtype, mod, _GN_DTYPES)
    grad_y = grad_y.to(x.dtype)
    grad_y = grad_y.transpose(1, 2).contiguous().transpose(1, 2) if channels_last else grad_y.contiguous()
    splits = mod.group_norm_splits(n, c, s, channels_last)
    workspace = torch.empty((2 * splits * n * c + 2 * n * num_groups,), dtype=torch.float32, device=x.device)
    grad_x = empty_in_layout(x)
    grad_w = torch.empty((c,), dtype=torch.float32, device=x.device)
    grad_b = torch.empty_like(grad_w)
    w, b = dense_affine(weight, c, 1.0, x), dense_affine(bias, c, 0.0, x)
    mean = mean.to(torch.float32).contiguous()
    rstd = rstd.to(torch.float32).contiguous()
    mod.group_norm_silu_backward(grad_y=grad_y.data_ptr(), x=x.data_ptr(), weight=w.data_ptr(), bias=b.data_ptr(),
                                 mean=mean.data_ptr(), rstd=rstd.data_ptr(), grad_x=grad_x.data_ptr(),
                                 grad_weight=grad_w.data_ptr(), grad_bias=grad_b.data_ptr(),
                                 workspace=workspace.data_ptr(), n=n, c=c, s=s, groups=num_groups, splits=splits,
                                 channels_last=channels_last, act=bool(act), storage=storage, stream=_stream(x))
    return grad_x, grad_w, grad_b
