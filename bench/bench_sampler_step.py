"""sampler_step: the fused kernel against the same update in torch eager and compiled.

    pytest bench/bench_sampler_step.py --benchmark-only
"""
import pytest
import torch

import _machine
from fastdiff import ops
from fastdiff.ops import StepCoefficients

# A DDPM step with clipping: x0 from eps, clamp, posterior mean, plus sigma * z.
COEFS = StepCoefficients(a1=1.02, a2=-0.2, c1=0.3, c2=0.69, sigma=0.1)
SHAPES = [(2, 3, 8, 8), (2, 3, 16, 16)] if _machine.SMOKE else [(64, 3, 32, 32), (64, 3, 256, 256)]


def eager_step(x, eps):
    """What a user writes without fastdiff (the noise drawn by torch)."""
    c = COEFS
    x0 = (c.a1 * x + c.a2 * eps).clamp(-1, 1)
    return c.c1 * x0 + c.c2 * x + c.sigma * torch.randn_like(x)


def fused_step(x, eps):
    return ops.sampler_step(x, eps, COEFS, seed=0, step=1, clip_denoised=True)


def fused_step_in_place(x, eps):
    """What fastdiff.sample does: x_t is the loop's buffer, overwritten by x_{t-1}."""
    return ops.sampler_step(x, eps, COEFS, seed=0, step=1, clip_denoised=True, out=x)


_compiled = torch.compile(eager_step)


def _inputs(shape):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _bytes(shape):
    n = 1
    for s in shape:
        n *= s
    return 3 * 4 * n  # read x, read eps, write x_prev (fp32)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["fastdiff", "fastdiff in-place", "eager", "compile"])
def test_sampler_step(benchmark, report, shape, impl):
    x, eps = _inputs(shape)
    fn = {"fastdiff": fused_step, "fastdiff in-place": fused_step_in_place, "eager": eager_step,
          "compile": _compiled}[impl]
    fn(x, eps)  # warm-up (and compilation)
    benchmark.group = f"sampler_step {shape} fp32"
    benchmark.pedantic(fn, args=(x, eps), rounds=30 if shape[-1] <= 32 else 8, warmup_rounds=2)
    report.add(benchmark, benchmark.group, impl, bytes_moved=_bytes(shape), baseline=impl in ("eager", "compile"))


@pytest.mark.parametrize("impl", ["fastdiff", "eager"])
def test_initial_noise(benchmark, report, impl):
    """x_T for a CIFAR batch: Philox in-kernel vs torch.randn."""
    shape = SHAPES[0]
    fn = {"fastdiff": lambda: ops.randn(shape, seed=0), "eager": lambda: torch.randn(shape)}[impl]
    benchmark.group = f"randn {shape} fp32"
    benchmark.pedantic(fn, rounds=30, warmup_rounds=2)
    report.add(benchmark, benchmark.group, impl, bytes_moved=_bytes(shape) / 3, baseline=impl == "eager")
