import os

# Triton kernels run on CPU tensors in Triton's interpreter, which is chosen when
# `@triton.jit` runs: set it before any test imports a kernel module (any sampler_step
# call may), not in the Triton test module alone.
if os.environ.get("FASTDIFF_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
