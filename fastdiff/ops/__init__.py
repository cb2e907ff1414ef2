"""Fused ops. Each has a pure-torch reference and compiled kernels, chosen by one table per
op (fastdiff/ops/_backend.py documents the rule and the `auto` order).

    with fastdiff.ops.use_backend("reference"): ...   # or FASTDIFF_BACKEND=reference
    fastdiff.ops.backend_for("sampler_step", x)      # which backend would run
"""
from fastdiff.ops._backend import BACKENDS, BackendError, backend_for, current_backend, use_backend
from fastdiff.ops.attention import attention, attention_reference
from fastdiff.ops.group_norm import group_norm_silu, group_norm_silu_reference
from fastdiff.ops.philox import philox_normal_reference
from fastdiff.ops.sampler_step import StepCoefficients, randn, sampler_step, sampler_step_reference

__all__ = [
    "BACKENDS",
    "BackendError",
    "backend_for",
    "StepCoefficients",
    "attention",
    "attention_reference",
    "current_backend",
    "group_norm_silu",
    "group_norm_silu_reference",
    "philox_normal_reference",
    "randn",
    "sampler_step",
    "sampler_step_reference",
    "use_backend",
]
