"""Fused ops. Each has a pure-torch reference and native kernels; see DESIGN.md.

    with fastdiff.ops.use_backend("reference"): ...   # or FASTDIFF_BACKEND=reference
"""
from fastdiff.ops._backend import BACKENDS, current_backend, use_backend
from fastdiff.ops.attention import attention, attention_reference
from fastdiff.ops.group_norm import group_norm_silu, group_norm_silu_reference
from fastdiff.ops.philox import philox_normal_reference
from fastdiff.ops.sampler_step import StepCoefficients, randn, sampler_step, sampler_step_reference

__all__ = [
    "BACKENDS",
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
