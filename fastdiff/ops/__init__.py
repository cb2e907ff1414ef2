"""Fused ops. Each has a pure-torch reference and native kernels; see DESIGN.md.

    with fastdiff.ops.use_backend("reference"): ...   # or FASTDIFF_BACKEND=reference
"""
from fastdiff.ops._backend import BACKENDS, current_backend, use_backend
from fastdiff.ops.philox import philox_normal_reference
from fastdiff.ops.sampler_step import StepCoefficients, randn, sampler_step, sampler_step_reference

__all__ = [
    "BACKENDS",
    "StepCoefficients",
    "current_backend",
    "philox_normal_reference",
    "randn",
    "sampler_step",
    "sampler_step_reference",
    "use_backend",
]
