"""How every fused op chooses its kernel: one table per op, one rule for all ops.

Backends (docs/design.md, "How a fused op is built and chosen"):

    reference  pure torch, any device and dtype: the ground truth
    native     the C++ CPU core, fastdiff._C (CPU tensors)
    triton     the Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1,
               for tests)
    cuda       the CUDA C++ core, fastdiff._C_cuda (CUDA tensors)
    aten       torch's own fused kernel where one does the same job and measures faster
               (attention on CPU: ATen's flash-attention kernel, which returns the same
               log-sum-exp and has its own backward; bench/bench_attention.py)

Each op file (sampler_step.py, group_norm.py, attention.py) builds one `OpTable` and
registers each of its kernels once, with what it supports: devices, dtypes, and a `limits`
function for anything else (head dim, sizes). The op's `torch.library.custom_op` (with its
fake and autograd) has one body that asks the table. Per-device `register_kernel` would split
the choice in two places (the device in torch's dispatcher, dtype and sizes here) and could
not refuse a forced backend on the wrong device, so the device is one fact of the table's.

The choice, for every op:
- a forced backend (`use_backend(name)`, else $FASTDIFF_BACKEND) runs if it is available
  (built / installed) and supports the call; otherwise `BackendError` says why. Never a silent
  fallback.
- `auto` (the default) takes the first kernel of the op's `auto` order for the tensor's
  device type that is available and supports the call:

      CPU tensors:   native, reference            sampler_step, randn, group_norm_silu
                     aten, native, reference      attention (ATen's CPU flash kernel measured
                                                  3-9x faster than ours: BENCHMARKS.md)
      CUDA tensors:  cuda, triton, reference      sampler_step, randn, group_norm_silu
                     triton, reference            attention (no CUDA C++ kernel)

  The compiled CUDA C++ kernels come first where they exist (no JIT compilation, no Triton
  needed at run time); Triton serves what they do not (float64 GroupNorm, attention).

`backend_for(op, tensor)` answers which backend a call would run (tests and benchmarks
use it); `assume_available(...)` and `emulate_cuda(lib)` let tests on a machine without
a GPU check the CUDA choices by construction.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch

BACKENDS = ("auto", "reference", "native", "triton", "cuda", "aten")

try:  # the compiled core; absent only when running from an unbuilt source tree
    from fastdiff import _C as native_lib  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without a build
    native_lib = None

try:  # the CUDA C++ core; built only with a CUDA toolkit (FASTDIFF_CUDA=AUTO|ON)
    from fastdiff import _C_cuda as cuda_lib  # type: ignore[attr-defined]
except ImportError:
    cuda_lib = None

_local = threading.local()
_overrides: Dict[str, bool] = {}
_emulated_cuda = None  # a host-emulated build of _C_cuda serving CPU tensors (tests)


class BackendError(RuntimeError):
    """A forced backend cannot serve the call (not built, not installed, or unsupported input)."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend requested now: the innermost `use_backend` block, else $FASTDIFF_BACKEND, else "auto"."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check_name(os.environ.get("FASTDIFF_BACKEND", "auto") or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the backend of every fused op inside the block (tests, benchmarks)."""
    _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


# --------------------------------------------------------------------------- availability
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _availability(name: str, device_type: str) -> Optional[str]:
    """Why backend `name` cannot run at all on `device_type` tensors here, or None."""
    if name in _overrides:
        return None if _overrides[name] else f"backend {name!r} marked unavailable"
    if name == "native" and native_lib is None:
        return "fastdiff._C is not built (install with `pip install .`)"
    if name == "triton":
        if not triton_available():
            return "triton is not installed (pip install 'fastdiff[triton]')"
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
        if device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is visible"
    if name == "cuda":
        if device_type == "cpu" and _emulated_cuda is not None:
            return None
        if cuda_lib is None:
            return "fastdiff._C_cuda is not built (install with a CUDA toolkit; FASTDIFF_CUDA=ON)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
    return None


@contextlib.contextmanager
def assume_available(**flags: bool) -> Iterator[None]:
    """Tests: treat backends as available or not (`assume_available(cuda=True, triton=False)`),
    so that choices for CUDA tensors can be checked on a machine without a GPU."""
    for name in flags:
        _check_name(name)
    saved = dict(_overrides)
    _overrides.update(flags)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


@contextlib.contextmanager
def emulate_cuda(lib) -> Iterator[None]:
    """Tests: the `cuda` backend serves CPU tensors with `lib`, a host-emulated build of
    fastdiff._C_cuda (csrc/cuda/host_emulation.h), through the ops' own dispatch."""
    global _emulated_cuda
    saved = _emulated_cuda
    _emulated_cuda = lib
    try:
        yield
    finally:
        _emulated_cuda = saved


def cuda_module_for(device: torch.device):
    """The `_lib=` the CUDA launchers take: the emulated module for CPU tensors, else None."""
    return _emulated_cuda if device.type == "cpu" else None


def dtype_code(lib, dtype: torch.dtype) -> int:
    """The kernel modules' code for `dtype` (csrc/dtypes.h, exported as `dtype_codes`)."""
    return lib.dtype_codes[str(dtype).replace("torch.", "")]


# --------------------------------------------------------------------------- tables
@dataclasses.dataclass(frozen=True)
class Call:
    """What a kernel needs to know to say whether it serves a call."""

    device: torch.device
    dtype: torch.dtype
    facts: Mapping[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One backend of one op: what it supports and its entry points."""

    backend: str
    devices: Optional[Tuple[str, ...]]         # device types; None = any
    dtypes: Optional[Tuple[torch.dtype, ...]]  # None = any floating dtype
    impls: Mapping[str, Callable]
    limits: Optional[Callable[[Call], Optional[str]]] = None  # why it cannot serve, or None

    def refusal(self, call: Call) -> Optional[str]:
        """None if this kernel serves `call`, else the reason it does not."""
        if self.devices is not None and call.device.type not in self.devices:
            return f"it runs on {'/'.join(self.devices)} tensors, got a {call.device.type} tensor"
        if self.dtypes is not None and call.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"it supports dtypes {names}, got {str(call.dtype).replace('torch.', '')}"
        reason = _availability(self.backend, call.device.type)
        if reason is None and self.limits is not None:
            reason = self.limits(call)
        return reason


class OpTable:
    """The kernels of one op and the order `auto` tries them in, per device type."""

    def __init__(self, op: str, auto: Mapping[str, Sequence[str]], facts: Optional[Callable] = None):
        self.op = op
        self.auto = {k: tuple(v) for k, v in auto.items()}
        self.kernels: Dict[str, Kernel] = {}
        self._facts = facts or (lambda t: {})

    def register(self, backend: str, *, devices=None, dtypes=None, limits=None, **impls: Callable) -> None:
        _check_name(backend)
        if backend in self.kernels:
            raise ValueError(f"{self.op}: backend {backend!r} registered twice")
        self.kernels[backend] = Kernel(backend, tuple(devices) if devices else None,
                                       tuple(dtypes) if dtypes else None, impls, limits)

    def call_for(self, tensor: torch.Tensor, **facts) -> Call:
        return Call(tensor.device, tensor.dtype, {**self._facts(tensor), **facts})

    def select(self, call: Call, requested: Optional[str] = None) -> Kernel:
        """The kernel that runs `call` (see the module docstring for the rule)."""
        name = requested or current_backend()
        if name != "auto":
            kernel = self.kernels.get(name)
            reason = f"{self.op} has no {name!r} kernel" if kernel is None else kernel.refusal(call)
            if reason is not None:
                raise BackendError(f"{self.op}: backend {name!r} was requested but cannot serve this call: {reason}")
            return kernel
        for candidate in self.auto.get(call.device.type, ()) + ("reference",):
            kernel = self.kernels.get(candidate)
            if kernel is not None and kernel.refusal(call) is None:
                return kernel
        raise BackendError(f"{self.op}: no kernel serves {call.dtype} tensors on {call.device}")

    def run(self, entry: str, call: Call, *args, **kwargs):
        return self.select(call).impls[entry](*args, **kwargs)


_TABLES: Dict[str, OpTable] = {}


def register_table(table: OpTable) -> OpTable:
    _TABLES[table.op] = table
    return table


def tables() -> Mapping[str, OpTable]:
    return dict(_TABLES)


def backend_for(op: str, tensor: Optional[torch.Tensor] = None, *, device=None, dtype=None,
                requested: Optional[str] = None, **facts) -> str:
    """The backend that would run `op` for `tensor` (the op's first input: x_t, x or q), or for a
    described call (`device=`, `dtype=`, op facts such as `head_dim=`), under the current
    `use_backend` setting; raises BackendError where the call would.

        fastdiff.ops.backend_for("sampler_step", x)          # "native" on CPU
        fastdiff.ops.backend_for("attention", device="cuda", dtype=torch.float16, head_dim=64)
    """
    if op not in _TABLES:
        raise ValueError(f"op must be one of {sorted(_TABLES)}, got {op!r}")
    table = _TABLES[op]
    if tensor is not None:
        call = table.call_for(tensor, **facts)
    else:
        if device is None or dtype is None:
            raise ValueError("backend_for needs a tensor, or both device= and dtype=")
        call = Call(torch.device(device), dtype, facts)
    return table.select(call, requested).backend
