"""group_norm_silu: the fused kernel against silu(group_norm(x)) in torch eager and compiled.

    pytest bench/bench_group_norm_silu.py --benchmark-only

Bytes are the minimum traffic of the op: forward reads x and writes y; forward+backward
also reads x and dy and writes dx (weights are negligible).

A load-robust cross-check on a shared machine: one thread, CPU time instead of wall time
(bench/conftest.py; the machine's limits too, bench/_machine.py),
    FASTDIFF_BENCH_THREADS=1 pytest ... --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

import _machine
from fastdiff.ops import group_norm_silu

GROUPS = 32
# (shape, dtypes): bf16 on the headline shape only, to keep the compile count down
CASES = [
    ((16, 128, 32, 32), (torch.float32, torch.bfloat16)),  # headline (goal: >= 2x eager fwd)
    ((64, 256, 8, 8), (torch.float32,)),
    ((8, 64, 16, 16), (torch.float32,)),
]
if _machine.SMOKE:
    CASES = [((2, 32, 4, 4), (torch.float32, torch.bfloat16)), ((1, 64, 2, 2), (torch.float32,))]
PARAMS = [(shape, dtype) for shape, dtypes in CASES for dtype in dtypes]


def eager(x, weight, bias):
    return F.silu(F.group_norm(x, GROUPS, weight, bias, 1e-5))


def fused(x, weight, bias):
    return group_norm_silu(x, GROUPS, weight, bias, 1e-5)


_compiled = torch.compile(eager)
_IMPLS = {"fastdiff": fused, "eager": eager, "compile": _compiled}


def _inputs(shape, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_(requires_grad)
    weight = (1 + 0.1 * torch.randn(shape[1], generator=g)).to(dtype).requires_grad_(requires_grad)
    bias = (0.1 * torch.randn(shape[1], generator=g)).to(dtype).requires_grad_(requires_grad)
    return x, weight, bias


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _rounds(shape):
    return 40 if _numel(shape) <= 2**21 else 15


@pytest.mark.parametrize("shape,dtype", PARAMS, ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}" for s, d in PARAMS])
@pytest.mark.parametrize("impl", ["fastdiff", "eager", "compile"])
def test_forward(benchmark, report, shape, dtype, impl):
    x, weight, bias = _inputs(shape, dtype, False)
    fn = _IMPLS[impl]
    with torch.no_grad():
        fn(x, weight, bias)  # warm-up (and compilation)
        benchmark.group = f"group_norm_silu fwd {shape} {str(dtype)[6:]}"
        benchmark.pedantic(fn, args=(x, weight, bias), rounds=_rounds(shape), warmup_rounds=3)
    report.add(benchmark, benchmark.group, impl, bytes_moved=2 * _numel(shape) * x.element_size(),
               baseline=impl != "fastdiff")


@pytest.mark.parametrize("shape,dtype", PARAMS, ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}" for s, d in PARAMS])
@pytest.mark.parametrize("impl", ["fastdiff", "eager", "compile"])
def test_forward_backward(benchmark, report, shape, dtype, impl):
    x, weight, bias = _inputs(shape, dtype, True)
    grad_y = torch.randn(shape).to(dtype)
    fn = _IMPLS[impl]

    def step():
        y = fn(x, weight, bias)
        return torch.autograd.grad(y, (x, weight, bias), grad_y)

    step()  # warm-up (and compilation)
    benchmark.group = f"group_norm_silu fwd+bwd {shape} {str(dtype)[6:]}"
    benchmark.pedantic(step, rounds=_rounds(shape), warmup_rounds=3)
    report.add(benchmark, benchmark.group, impl, bytes_moved=5 * _numel(shape) * x.element_size(),
               baseline=impl != "fastdiff")
