"""The installed package: the compiled core is there and sane."""
import os

import pytest

import fastdiff
from fastdiff.ops import _backend


def test_native_core_is_built_when_required():
    if os.environ.get("FASTDIFF_REQUIRE_NATIVE") == "1":
        assert _backend.native_lib is not None, "fastdiff._C is missing: `pip install .` did not build it"
    elif _backend.native_lib is None:
        pytest.skip("fastdiff._C not built (running from a source tree?)")
    assert _backend.native_lib.has_openmp in (True, False)


def test_public_api():
    for name in ["NoiseSchedule", "GaussianDiffusion", "sample", "ops"]:
        assert hasattr(fastdiff, name)
    for name in ["sampler_step", "use_backend", "randn", "StepCoefficients"]:
        assert hasattr(fastdiff.ops, name)
