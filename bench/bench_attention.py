"""attention: fastdiff.ops.attention (auto: ATen's CPU flash kernel behind fastdiff's op) and
fastdiff's own flash-style C++ kernel (`native`) against torch's scaled_dot_product_attention,
eager and compiled.

    pytest bench/bench_attention.py --benchmark-only

FLOPs: forward 4 B H L^2 D (two matmuls); forward+backward 3.5x that (backward: five
matmuls, one of them recomputing the scores), the count flash-attention reports.

A load-robust cross-check on a shared machine: one thread, CPU time instead of wall time
(bench/conftest.py; the machine's limits too, bench/_machine.py),
    FASTDIFF_BENCH_THREADS=1 pytest ... --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

import _machine
from fastdiff.ops import attention, use_backend

SHAPES = [(8, 1, 256, 256), (8, 4, 256, 64), (8, 32, 256, 8)]  # (B, H, L, D)
if _machine.SMOKE:
    SHAPES = [(1, 1, 16, 32), (1, 2, 16, 8)]
DTYPES = [torch.float32, torch.bfloat16]
PARAMS = [(s, d) for s in SHAPES for d in DTYPES]
IDS = [f"{'x'.join(map(str, s))}-{str(d)[6:]}" for s, d in PARAMS]


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


_compiled = torch.compile(sdpa)


def native(q, k, v):
    with use_backend("native"):
        return attention(q, k, v)


_IMPLS = {"fastdiff": attention, "fastdiff-native": native, "sdpa": sdpa, "compile": _compiled}
_OURS = ("fastdiff", "fastdiff-native")


def _inputs(shape, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(3)]


def _flops(shape):
    b, h, l, d = shape
    return 4.0 * b * h * l * l * d


@pytest.mark.parametrize("shape,dtype", PARAMS, ids=IDS)
@pytest.mark.parametrize("impl", list(_IMPLS))
def test_forward(benchmark, report, shape, dtype, impl):
    q, k, v = _inputs(shape, dtype, False)
    fn = _IMPLS[impl]
    with torch.no_grad():
        fn(q, k, v)  # warm-up (and compilation)
        benchmark.group = f"attention fwd {shape} {str(dtype)[6:]}"
        benchmark.pedantic(fn, args=(q, k, v), rounds=20, warmup_rounds=2)
    report.add(benchmark, benchmark.group, impl, flops=_flops(shape), baseline=impl not in _OURS)


@pytest.mark.parametrize("shape,dtype", PARAMS, ids=IDS)
@pytest.mark.parametrize("impl", list(_IMPLS))
def test_forward_backward(benchmark, report, shape, dtype, impl):
    q, k, v = _inputs(shape, dtype, True)
    grad_out = torch.randn(shape).to(dtype)
    fn = _IMPLS[impl]

    def step():
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    step()  # warm-up (and compilation)
    benchmark.group = f"attention fwd+bwd {shape} {str(dtype)[6:]}"
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    report.add(benchmark, benchmark.group, impl, flops=3.5 * _flops(shape), baseline=impl not in _OURS)
