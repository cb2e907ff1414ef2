"""Tensor helpers shared by every kernel family (CPU core, Triton, CUDA C++) and by the ops
that call them: layouts, saved-statistics dtype, dense affine vectors. No Triton import, so
the ops layer can use it on machines without Triton."""
from __future__ import annotations

import contextlib
import functools
import math
import struct
from typing import List, Optional, Tuple

import torch


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of saved statistics (GroupNorm mean/rstd, attention lse): fp32, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channels_last_3d(x3: torch.Tensor) -> Optional[bool]:
    """For a (N, C, S) tensor: False if NCS-dense, True if NSC-dense, None otherwise."""
    if x3.is_contiguous():
        return False
    if x3.transpose(1, 2).is_contiguous():
        return True
    return None


def require_layout(x3: torch.Tensor) -> bool:
    """channels_last_3d for a tensor that must be NCS- or NSC-dense."""
    layout = channels_last_3d(x3)
    if layout is None:
        raise ValueError(f"x must be NCS- or NSC-dense, got strides {x3.stride()} for shape {tuple(x3.shape)}")
    return layout


def empty_in_layout(x3: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialised (N, C, S) tensor in x3's layout (NSC-dense if x3 is, else NCS-dense)."""
    dtype = dtype or x3.dtype
    n, c, s = x3.shape
    if channels_last_3d(x3):
        return torch.empty((n, s, c), dtype=dtype, device=x3.device).transpose(1, 2)
    return torch.empty((n, c, s), dtype=dtype, device=x3.device)


def dense_affine(t: Optional[torch.Tensor], channels: int, fill: float, like: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GroupNorm weight or bias as a dense (C,) tensor of `dtype` on like's device; `fill` for None."""
    if t is None:
        return torch.full((channels,), fill, dtype=dtype, device=like.device)
    return t.detach().to(dtype).contiguous()


def dense_head_dim(t: torch.Tensor) -> torch.Tensor:
    """A (B, H, L, D) tensor whose head dim is dense (unit stride), copied only if needed."""
    return t if t.stride(3) == 1 or t.shape[3] == 1 else t.contiguous()


def head_strides(t: torch.Tensor) -> List[int]:
    """(batch, head, position) strides of a (B, H, L, D) tensor with a dense head dim."""
    return [int(s) for s in t.stride()[:3]]


def device_guard(t: torch.Tensor):
    """Make t's device current for a launch: Triton and the CUDA C++ launchers run on the
    current device, which need not be the tensor's (tensors on cuda:1 while cuda:0 is current)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def split_fp64(value: float) -> Tuple[float, float, float]:
    """(hi, lo, lo2), each exactly an fp32, with hi + lo + lo2 == value (3 x 24 bits >= 53) for
    finite values in fp32's range: how an fp64 scalar reaches a Triton kernel, whose float
    arguments are fp32."""
    try:
        hi = struct.unpack("f", struct.pack("f", value))[0]
        rest = value - hi
        lo = struct.unpack("f", struct.pack("f", rest))[0]
        lo2 = struct.unpack("f", struct.pack("f", rest - lo))[0]
    except (OverflowError, ValueError):
        return value, 0.0, 0.0
    if not math.isfinite(hi):
        return value, 0.0, 0.0
    return hi, lo, lo2


def on_tensor_device(launcher):
    """Decorator for a launcher: run it with its first tensor argument's device current
    (`device_guard`). Every public launcher of the Triton and CUDA C++ kernels carries it."""
    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        with device_guard(tensor) if tensor is not None else contextlib.nullcontext():
            return launcher(*args, **kwargs)
    guarded.device_guarded = True
    return guarded
