"""`fastdiff.ops.sampler_step`: one reverse-diffusion step, fused, with in-kernel noise.

Per element (coefficients from `StepCoefficients`, built by fastdiff.sampling):

    x0   = a1 * x_t + a2 * model_out          # eps, x0 or v parameterisation (Eq. 71)
    x0   = clamp(x0, -1, 1)                   # if clip_denoised
    mean = c1 * x0 + c2 * x_t                 # DDPM posterior mean (Eq. 68) or DDIM (Eq. 114)
    x    = mean + sigma * std * z             # z: Philox stream (seed, sample, step, element)

`std` is 1 for a fixed variance; for a learned one it is exp(log_var / 2) with log_var
the model's variance channels ("learned") or Eq. 101's interpolation between
`min_log` (log beta-tilde) and `max_log` (log beta) ("learned_range").
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

from fastdiff.ops import _backend
from fastdiff.ops.philox import INITIAL_NOISE_STEP, MASK32, philox_normal_reference
from fastdiff.triton_kernels import cuda_native

VARIANCE_MODES = {"fixed": 0, "learned": 1, "learned_range": 2}
_MAX_SEED = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class StepCoefficients:
    """Scalars of one sampler step (see the module docstring)."""

    a1: float
    a2: float
    c1: float
    c2: float
    sigma: float
    min_log: float = 0.0
    max_log: float = 0.0

    def as_list(self) -> List[float]:
        return [float(v) for v in dataclasses.astuple(self)]


# --------------------------------------------------------------------------- checks
def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _check_step_inputs(x_t, model_output, variance: str, seed, step, sample_offset) -> int:
    if not isinstance(x_t, torch.Tensor):
        raise TypeError(f"x_t must be a torch.Tensor, got {type(x_t).__name__}")
    if not isinstance(model_output, torch.Tensor):
        raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
    if not x_t.is_floating_point():
        raise TypeError(f"x_t must be a floating-point tensor, got dtype {x_t.dtype}")
    if model_output.dtype != x_t.dtype:
        raise TypeError(f"model_output dtype {model_output.dtype} does not match x_t dtype {x_t.dtype}")
    if model_output.device != x_t.device:
        raise ValueError(f"model_output is on {model_output.device} but x_t is on {x_t.device}")
    if x_t.dim() < 1:
        raise ValueError("x_t must have a batch dimension, got a 0-d tensor")
    if variance not in VARIANCE_MODES:
        raise ValueError(f"variance must be one of {tuple(VARIANCE_MODES)}, got {variance!r}")
    if variance == "fixed":
        if model_output.shape != x_t.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} must equal x_t shape "
                             f"{tuple(x_t.shape)} for a fixed variance")
    else:
        expected = (x_t.shape[0], 2 * x_t.shape[1], *x_t.shape[2:]) if x_t.dim() >= 2 else None
        if expected is None or tuple(model_output.shape) != expected:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} must be {expected} "
                             f"(mean channels then variance channels) for variance={variance!r}")
    _check_int("seed", seed, 0, _MAX_SEED)
    _check_int("step", step, 0, MASK32)
    _check_int("sample_offset", sample_offset, 0, MASK32)
    if sample_offset + x_t.shape[0] - 1 > MASK32:
        raise ValueError(f"sample_offset + batch must stay below 2^32, got {sample_offset} + {x_t.shape[0]}")
    return VARIANCE_MODES[variance]


# --------------------------------------------------------------------------- reference
def sampler_step_reference(x_t: torch.Tensor, model_output: torch.Tensor, coefs: Sequence[float],
                           seed: int, step: int, sample_offset: int = 0, clip_denoised: bool = False,
                           variance_mode: int = 0) -> torch.Tensor:
    """Pure-torch ground truth, computed in float64 and returned in x_t's dtype."""
    a1, a2, c1, c2, sigma, min_log, max_log = coefs
    x = x_t.to(torch.float64)
    out = model_output.to(torch.float64)
    mean_out = out[:, : x.shape[1]] if variance_mode else out
    x0 = a1 * x + a2 * mean_out
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    result = c1 * x0 + c2 * x
    if sigma != 0.0:
        batch = x.shape[0]
        z = philox_normal_reference(batch, x[0].numel(), seed=seed, step=step,
                                    sample_offset=sample_offset, device=x.device).reshape(x.shape)
        scale = torch.full_like(x, sigma)
        if variance_mode == VARIANCE_MODES["learned"]:
            scale = sigma * torch.exp(0.5 * out[:, x.shape[1]:])
        elif variance_mode == VARIANCE_MODES["learned_range"]:
            frac = (out[:, x.shape[1]:] + 1.0) / 2.0  # Eq. 101 (errata): v in [-1, 1]
            scale = sigma * torch.exp(0.5 * (frac * max_log + (1.0 - frac) * min_log))
        result = result + scale * z
    return result.to(x_t.dtype)


# --------------------------------------------------------------------------- kernels
def _samples_contiguous(t: torch.Tensor) -> bool:
    """Each sample t[i] is one dense row-major block (the batch stride may be larger)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return t.shape[0] <= 1 or t.stride(0) >= expected


def _finish(y: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """Return y, or copy it into `out` (unless the kernel already wrote there) and return out."""
    if out is None or out is y:
        return y if out is None else out
    out.copy_(y)
    return out


def _reference_step(x_t, model_output, coefs, seed, step, sample_offset, clip_denoised, variance_mode, out=None):
    return _finish(sampler_step_reference(x_t, model_output, coefs, seed, step, sample_offset, clip_denoised,
                                          variance_mode).contiguous(), out)


def _native_step(x_t, model_output, coefs, seed, step, sample_offset, clip_denoised, variance_mode, out=None):
    """The C++ kernel (fp32 / fp64; fp16 and bf16 through an fp32 copy); writes `out` when given
    (it may be x_t itself: the update is elementwise, each element read before it is written)."""
    lib = _backend.native_lib
    compute_dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    x = x_t.to(compute_dtype).contiguous()
    mo = model_output.to(compute_dtype)
    if not (variance_mode == 0 and _samples_contiguous(mo)):
        mo = mo.contiguous()  # a slice out[:, :C] of a contiguous output is read in place
    direct = out is not None and out.dtype == compute_dtype and out.is_contiguous()
    y = out if direct else torch.empty_like(x, memory_format=torch.contiguous_format)
    batch = x.shape[0]
    numel = x[0].numel() if batch else 0
    if batch and numel:
        a1, a2, c1, c2, sigma, min_log, max_log = coefs
        lib.sampler_step(
            x=x.data_ptr(), model_output=mo.data_ptr(), y=y.data_ptr(), batch=batch, numel_per_sample=numel,
            output_sample_stride=mo.stride(0) if variance_mode == 0 else mo[0].numel(),
            a1=a1, a2=a2, c1=c1, c2=c2, sigma=sigma, min_log=min_log, max_log=max_log, seed=seed, step=step,
            sample_offset=sample_offset, clip=clip_denoised, variance_mode=variance_mode,
            dtype=_backend.dtype_code(lib, compute_dtype), num_threads=torch.get_num_threads())
    if out is None:
        return y.to(x_t.dtype)
    return _finish(y, out)


def _triton_module():
    from fastdiff.triton_kernels import sampler_step as triton_module  # imports Triton: only when chosen
    return triton_module


def _triton_step(x_t, model_output, coefs, seed, step, sample_offset, clip_denoised, variance_mode, out=None):
    return _triton_module().sampler_step_triton(x_t, model_output, coefs, seed, step, sample_offset,
                                                clip_denoised, variance_mode, out=out)


def _cuda_step(x_t, model_output, coefs, seed, step, sample_offset, clip_denoised, variance_mode, out=None):
    y = cuda_native.sampler_step_cuda(x_t, model_output, coefs, seed, step, sample_offset, clip_denoised,
                                      variance_mode, _lib=_backend.cuda_module_for(x_t.device))
    return _finish(y, out)


def _host_index(coef_table: torch.Tensor, step_index: torch.Tensor) -> Tuple[int, List[float]]:
    """Reference and CPU kernel: read the step index on the host (free for CPU tensors) and check it."""
    index = int(step_index.item())
    if not 0 <= index < coef_table.shape[0]:
        raise IndexError(f"step_index {index} is outside the coefficient table's {coef_table.shape[0]} rows")
    return index, [float(v) for v in coef_table[index].tolist()]


def _host_table_step(step_fn):
    def run(x_t, model_output, coef_table, step_index, seed, sample_offset, clip_denoised, variance_mode):
        index, coefs = _host_index(coef_table, step_index)
        return step_fn(x_t, model_output, coefs, seed, index, sample_offset, clip_denoised, variance_mode)
    return run


def _triton_table_step(x_t, model_output, coef_table, step_index, seed, sample_offset, clip_denoised,
                       variance_mode):
    return _triton_module().sampler_step_table_triton(x_t, model_output, coef_table, step_index, seed,
                                                      sample_offset, clip_denoised, variance_mode)


def _cuda_table_step(x_t, model_output, coef_table, step_index, seed, sample_offset, clip_denoised,
                     variance_mode):
    return cuda_native.sampler_step_table_cuda(x_t, model_output, coef_table, step_index, seed, sample_offset,
                                               clip_denoised, variance_mode,
                                               _lib=_backend.cuda_module_for(x_t.device))


_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TABLE = _backend.register_table(_backend.OpTable(
    "sampler_step", auto={"cpu": ("native",), "cuda": ("cuda", "triton")}))
TABLE.register("reference", step=_reference_step, table=_host_table_step(_reference_step))
TABLE.register("native", devices=("cpu",), dtypes=_FLOATS, step=_native_step, table=_host_table_step(_native_step))
TABLE.register("triton", devices=("cuda", "cpu"), dtypes=_FLOATS, step=_triton_step, table=_triton_table_step)
TABLE.register("cuda", devices=("cuda", "cpu"), dtypes=_FLOATS, step=_cuda_step, table=_cuda_table_step)


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastdiff::sampler_step", mutates_args=())
def _sampler_step_op(x_t: torch.Tensor, model_output: torch.Tensor, coefs: List[float], seed: int,
                     step: int, sample_offset: int, clip_denoised: bool, variance_mode: int) -> torch.Tensor:
    return TABLE.run("step", TABLE.call_for(x_t), x_t, model_output, coefs, seed, step, sample_offset,
                     clip_denoised, variance_mode)


@_sampler_step_op.register_fake
def _(x_t, model_output, coefs, seed, step, sample_offset, clip_denoised, variance_mode):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastdiff::sampler_step_out", mutates_args=("out",))
def _sampler_step_out_op(x_t: torch.Tensor, model_output: torch.Tensor, coefs: List[float], seed: int,
                         step: int, sample_offset: int, clip_denoised: bool, variance_mode: int,
                         out: torch.Tensor) -> None:
    """`fastdiff::sampler_step` writing into `out` (which may be x_t): no allocation, no
    first-touch page faults of a fresh output on every step."""
    TABLE.run("step", TABLE.call_for(x_t), x_t, model_output, coefs, seed, step, sample_offset, clip_denoised,
              variance_mode, out=out)


def sampler_step(x_t: torch.Tensor, model_output: torch.Tensor, coefs: StepCoefficients, *, seed: int,
                 step: int, sample_offset: int = 0, clip_denoised: bool = False,
                 variance: str = "fixed", out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One fused reverse step; returns x_{t-1} (contiguous, x_t's dtype).

    `step` indexes the noise stream (the sampler's step counter), `sample_offset` is the
    global index of this batch's first sample, so a batch split into pieces draws the
    same noise as the whole batch. With `out` (x_t itself is allowed) the result is
    written there and `out` returned.
    """
    if not isinstance(coefs, StepCoefficients):
        raise TypeError(f"coefs must be a fastdiff.ops.StepCoefficients, got {type(coefs).__name__}")
    mode = _check_step_inputs(x_t, model_output, variance, seed, step, sample_offset)
    if out is None:
        return _sampler_step_op(x_t, model_output, coefs.as_list(), seed, step, sample_offset,
                                bool(clip_denoised), mode)
    if not isinstance(out, torch.Tensor) or out.shape != x_t.shape or out.dtype != x_t.dtype \
            or out.device != x_t.device:
        raise ValueError(f"out must be a tensor like x_t ({tuple(x_t.shape)}, {x_t.dtype}, {x_t.device}), got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    _check_no_partial_overlap(out, x_t=x_t, model_output=model_output)
    _sampler_step_out_op(x_t, model_output, coefs.as_list(), seed, step, sample_offset, bool(clip_denoised),
                         mode, out)
    return out


def _byte_span(t: torch.Tensor) -> Tuple[int, int]:
    """[first, last + 1) byte addresses a tensor with non-negative strides can touch."""
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def _check_no_partial_overlap(out: torch.Tensor, **inputs: torch.Tensor) -> None:
    """`out` may be an input itself (in place: each element is read before it is written) but
    must not overlap one partly: the kernels read and write blocks in parallel, and a shifted
    view would read elements already overwritten (torch's own ops refuse this too)."""
    if torch.compiler.is_compiling() or isinstance(out, torch._subclasses.FakeTensor) or out.numel() == 0:
        return  # under tracing there is no memory to compare
    if any(stride == 0 and size > 1 for size, stride in zip(out.shape, out.stride())) or \
            any(stride < 0 for stride in out.stride()):
        raise ValueError(f"out must not overlap itself (strides {out.stride()} for shape {tuple(out.shape)})")
    out_start, out_end = _byte_span(out)
    for name, t in inputs.items():
        if t.numel() == 0 or t.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
            continue
        exact = t.data_ptr() == out.data_ptr() and t.shape == out.shape and t.stride() == out.stride() \
            and t.dtype == out.dtype
        start, end = _byte_span(t)
        if not exact and start < out_end and out_start < end:
            raise ValueError(f"out partially overlaps {name} (same memory, different view); pass out={name} "
                             "itself for an in-place step, or a separate tensor")


# --------------------------------------------------------------------------- table-driven step
def coefficient_table(coefs: Sequence[StepCoefficients], device="cpu") -> torch.Tensor:
    """(S, 7) float64 table whose row i holds step i's coefficients (`StepCoefficients` order)."""
    return torch.tensor([c.as_list() for c in coefs], dtype=torch.float64, device=device).reshape(-1, 7)


@torch.library.custom_op("fastdiff::sampler_step_table", mutates_args=())
def _sampler_step_table_op(x_t: torch.Tensor, model_output: torch.Tensor, coef_table: torch.Tensor,
                           step_index: torch.Tensor, seed: int, sample_offset: int, clip_denoised: bool,
                           variance_mode: int) -> torch.Tensor:
    """`fastdiff::sampler_step` with coefficients coef_table[i] and noise step i, i = step_index
    read on the device (Triton, CUDA): a CUDA graph captures it once and replays it for every step."""
    return TABLE.run("table", TABLE.call_for(x_t), x_t, model_output, coef_table, step_index, seed, sample_offset,
                     clip_denoised, variance_mode)


@_sampler_step_table_op.register_fake
def _(x_t, model_output, coef_table, step_index, seed, sample_offset, clip_denoised, variance_mode):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


def sampler_step_table(x_t: torch.Tensor, model_output: torch.Tensor, coef_table: torch.Tensor,
                       step_index: torch.Tensor, *, seed: int, sample_offset: int = 0,
                       clip_denoised: bool = False, variance: str = "fixed") -> torch.Tensor:
    """`sampler_step` at the step i held by the 0-d int64 tensor `step_index` (on x_t's device):
    coefficients coef_table[i] (a `coefficient_table`), noise from stream step i.

    Equal to `sampler_step(x_t, model_output, coefs[i], step=i, ...)`. The Triton kernel reads
    i on the device (no host synchronisation; i must lie in [0, S)); the reference and CPU
    kernels read it on the host and check it.
    """
    mode = _check_step_inputs(x_t, model_output, variance, seed, 0, sample_offset)
    if not isinstance(coef_table, torch.Tensor) or coef_table.dtype != torch.float64 or coef_table.dim() != 2 \
            or coef_table.shape[1] != 7 or coef_table.shape[0] < 1:
        raise ValueError("coef_table must be a float64 tensor of shape (S, 7) with S >= 1, got "
                         f"{getattr(coef_table, 'dtype', type(coef_table).__name__)} "
                         f"{tuple(getattr(coef_table, 'shape', ()))}")
    if not isinstance(step_index, torch.Tensor) or step_index.dtype != torch.int64 or step_index.dim() != 0:
        raise ValueError("step_index must be a 0-d int64 tensor, got "
                         f"{getattr(step_index, 'dtype', type(step_index).__name__)} "
                         f"{tuple(getattr(step_index, 'shape', ()))}")
    for name, t in (("coef_table", coef_table), ("step_index", step_index)):
        if t.device != x_t.device:
            raise ValueError(f"{name} is on {t.device} but x_t is on {x_t.device}")
    return _sampler_step_table_op(x_t, model_output, coef_table, step_index, seed, sample_offset,
                                  bool(clip_denoised), mode)


# --------------------------------------------------------------------------- plain noise
def randn(shape: Tuple[int, ...], *, seed: int, step: int = INITIAL_NOISE_STEP, sample_offset: int = 0,
          dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """Standard normals from the fastdiff stream; shape[0] is the sample index.

    With the default `step` this is the x_T that `fastdiff.sample` starts from.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 0 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of non-negative sizes, got {shape}")
    _check_int("seed", seed, 0, _MAX_SEED)
    _check_int("step", step, 0, MASK32)
    _check_int("sample_offset", sample_offset, 0, MASK32)
    device = torch.device(device)
    batch = shape[0]
    numel = 1
    for s in shape[1:]:
        numel *= s
    return RANDN_TABLE.run("randn", _backend.Call(device, dtype), shape, batch, numel, seed, step, sample_offset,
                           dtype, device)


def _reference_randn(shape, batch, numel, seed, step, sample_offset, dtype, device):
    z = philox_normal_reference(batch, numel, seed=seed, step=step, sample_offset=sample_offset, device=device)
    return z.reshape(shape).to(dtype)


def _native_randn(shape, batch, numel, seed, step, sample_offset, dtype, device):
    y = torch.empty(shape, dtype=dtype)
    if batch * numel:
        lib = _backend.native_lib
        lib.philox_normal(y=y.data_ptr(), batch=batch, numel_per_sample=numel, seed=seed, step=step,
                          sample_offset=sample_offset, dtype=_backend.dtype_code(lib, dtype),
                          num_threads=torch.get_num_threads())
    return y


def _triton_randn(shape, batch, numel, seed, step, sample_offset, dtype, device):
    return _triton_module().randn_triton(shape, seed, step, sample_offset, dtype, device)


def _cuda_randn(shape, batch, numel, seed, step, sample_offset, dtype, device):
    return cuda_native.randn_cuda(shape, seed, step, sample_offset, dtype, device,
                                  _lib=_backend.cuda_module_for(device))


RANDN_TABLE = _backend.register_table(_backend.OpTable(
    "randn", auto={"cpu": ("native",), "cuda": ("cuda", "triton")}))
RANDN_TABLE.register("reference", randn=_reference_randn)
RANDN_TABLE.register("native", devices=("cpu",), dtypes=(torch.float32, torch.float64), randn=_native_randn)
RANDN_TABLE.register("triton", devices=("cuda", "cpu"), dtypes=_FLOATS, randn=_triton_randn)
RANDN_TABLE.register("cuda", devices=("cuda", "cpu"), dtypes=_FLOATS, randn=_cuda_randn)
