"""The CPU kernels never read or write out of bounds: C++ harnesses built with
AddressSanitizer call them on odd sizes with exact-size buffers."""
import os

import pytest

from native_harness import ROOT, asan_build_and_run


@pytest.mark.parametrize("march", ["native", "x86-64"])  # the vector paths and the portable build
def test_sampler_step_in_bounds(tmp_path, march):
    if march == "x86-64" and os.uname().machine != "x86_64":
        pytest.skip("portable x86-64 build only on x86-64")
    with open(os.path.join(ROOT, "tests", "native", "sampler_step_bounds.cpp")) as f:
        harness = f.read()
    asan_build_and_run(tmp_path, harness, ["csrc/cpu/sampler_step.cpp"], march)
