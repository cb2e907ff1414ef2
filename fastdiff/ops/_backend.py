"""Backend selection for the fused ops (DESIGN.md: reference | native | triton)."""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator, Optional, Union

import torch

BACKENDS = ("auto", "reference", "native", "triton")

try:  # the compiled core; absent only when running from an unbuilt source tree
    from fastdiff import _C as native_lib  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without a build
    native_lib = None

_local = threading.local()


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


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(device: torch.device, op: str, has_triton_kernel: Union[bool, Callable[[], bool]] = False,
            requested: Optional[str] = None) -> str:
    """The backend that will run `op` for tensors on `device`.

    `has_triton_kernel` may be a callable, asked only when the answer matters (it may
    import Triton, which CPU-only paths should not pay for)."""
    name = requested or current_backend()

    def triton_kernel() -> bool:
        return bool(has_triton_kernel() if callable(has_triton_kernel) else has_triton_kernel)

    if name == "auto":
        if device.type == "cpu":
            return "native" if native_lib is not None else "reference"
        if device.type == "cuda" and triton_available() and triton_kernel():
            return "triton"
        return "reference"
    if name == "native":
        if native_lib is None:
            raise RuntimeError(f"{op}: backend 'native' requested but fastdiff._C is not built "
                               "(install with `pip install .`)")
        if device.type != "cpu":
            raise RuntimeError(f"{op}: backend 'native' runs on CPU tensors, got device {device}")
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' requested but triton is not installed "
                               "(pip install 'fastdiff[triton]')")
        if not triton_kernel():
            raise RuntimeError(f"{op}: no Triton kernel for this op yet")
    return name
