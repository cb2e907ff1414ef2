"""End to end at the machine's limit (#16 §1): fastdiff.optimize against diffusers.

    pytest bench/bench_e2e.py --benchmark-only            # ddpm-cifar10, batch 8: compiles take minutes
    FASTDIFF_BENCH_SMOKE=1 pytest bench/bench_e2e.py --benchmark-disable   # tiny, traced by dynamo only

For each precision (fp32; bf16 = autocast, the same network):
- `forward`: one forward of ddpm-cifar10 at batch 8: fastdiff eager, fastdiff.optimize (compile with
  freezing, channels_last, bf16 where asked), diffusers' UNet2DModel of the same configuration
  eager, and diffusers under the best a user can apply by hand (torch.compile with inductor
  freezing + channels_last). The FLOPs of the forward are counted once with
  torch.utils.flop_counter; the summary prints each as a fraction of a measured peak (the better
  of a large GEMM and a large convolution in the same dtype, run in the same session).
- `train`: one training step (forward, backward, AdamW) with optimize(mode="train") and the
  compiled AdamW step (fastdiff.optimization.CompiledUpdate) against diffusers eager.
- `ddim`: DDIM sampling timed over a few steps, reported as DDIM-50 images/s.
diffusers parts skip without diffusers (`pip install fastdiff[bench]`). Smoke mode (CI) uses the
tiny preset and torch.compile's "eager" backend (a trace, no inductor code generation: compiling
the full network takes minutes on 2 cores); FASTDIFF_BENCH_INDUCTOR=1 forces inductor there too.
The first-call (compile) time of each compiled model is kept in extra_info["compile_s"].
"""
from __future__ import annotations

import functools
import os
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import _machine
import fastdiff
from bench_unet import _DiffusersAsEps, _diffusers_unet
from fastdiff.models.unet import UNet
from fastdiff.optimization import CompiledUpdate

PRESET, BATCH = ("tiny", 2) if _machine.SMOKE else ("ddpm-cifar10", 8)
BACKEND = "eager" if _machine.SMOKE and os.environ.get("FASTDIFF_BENCH_INDUCTOR") != "1" else "inductor"
PRECISIONS = ["fp32", "bf16"]
IMPLS = ["fastdiff-eager", "fastdiff-optimize", "diffusers-eager", "diffusers-compile"]
DDIM_TIMED_STEPS = 2 if _machine.SMOKE else 3
ROUNDS = 1 if _machine.SMOKE else 5
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _input():
    g = torch.Generator().manual_seed(0)
    size = UNet.preset(PRESET).config["image_size"]
    return torch.rand(BATCH, 3, size, size, generator=g) * 2 - 1, torch.randint(0, 1000, (BATCH,), generator=g)


def _autocast(precision):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def _plain(impl: str, precision: str, train: bool = False):
    """A callable (x, t) -> fp32 output for impl, and the module holding its parameters."""
    torch.manual_seed(0)
    if impl.startswith("diffusers"):
        module = _DiffusersAsEps(_diffusers_unet(PRESET))
    else:
        module = UNet.preset(PRESET, dropout=0.0)
    module.train(train)
    if impl == "fastdiff-optimize":
        fast = fastdiff.optimize(module, precision=precision, mode="train" if train else "inference", backend=BACKEND)
        return fast, module, fast.path
    if impl == "diffusers-compile":
        # the best a user can apply to diffusers by hand: inductor freezing + channels_last
        module = module.to(memory_format=torch.channels_last)
        # freezing as a user sets it, in inductor's global config: torch.compile(options={"freezing":
        # True}) is silently ignored in torch 2.13 (see fastdiff/optimization.py)
        import torch._inductor.config as inductor_config

        compiled = torch.compile(module, backend=BACKEND)

        def fn(x, t):
            with torch.no_grad() if not train else torch.enable_grad(), _autocast(precision), \
                    inductor_config.patch(freezing=not train and BACKEND == "inductor"):
                return compiled(x.contiguous(memory_format=torch.channels_last), t).float()
        return fn, module, f"torch.compile({BACKEND}, freezing) + channels_last"

    def fn(x, t):
        with torch.no_grad() if not train else torch.enable_grad(), _autocast(precision):
            return module(x, t).float()
    return fn, module, "eager"


def _first_call(benchmark, fn, *args):
    start = time.perf_counter()
    fn(*args)
    benchmark.extra_info["compile_s"] = round(time.perf_counter() - start, 2)


@functools.lru_cache(maxsize=None)
def _peak(precision: str) -> float:
    """GFLOP/s limit in the precision's dtype (large GEMM or convolution, this session)."""
    return _machine.peak_gflops(DTYPE[precision])


@functools.lru_cache(maxsize=None)
def _forward_flops() -> int:
    x, t = _input()
    model = UNet.preset(PRESET, dropout=0.0).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, report, impl, precision):
    fn, _, path = _plain(impl, precision)
    x, t = _input()
    _first_call(benchmark, fn, x, t)
    benchmark.group = f"e2e forward {PRESET} b{BATCH} {precision}"
    benchmark.extra_info["path"] = path
    benchmark.pedantic(fn, args=(x, t), rounds=ROUNDS, warmup_rounds=1)
    flops = _forward_flops()
    peak = None
    if getattr(benchmark, "stats", None):
        peak = _peak(precision)
        achieved = flops / benchmark.stats.stats.median / 1e9
        benchmark.extra_info.update({"GFLOP/s": round(achieved, 1), "peak GFLOP/s": round(peak, 1),
                                     "fraction of peak": round(achieved / peak, 3)})
    report.add(benchmark, benchmark.group, impl, flops=flops, baseline=impl.startswith("diffusers"),
               peak=(f"{precision} peak", peak) if peak else None)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", ["fastdiff-optimize", "fastdiff-eager", "diffusers-eager"])
def test_train_step(benchmark, report, impl, precision):
    fn, module, path = _plain(impl, precision, train=True)
    diffusion = fastdiff.GaussianDiffusion(fastdiff.NoiseSchedule.linear(1000))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, foreach=True)
    # the fast path's optimizer step is compiled too (what `fastdiff train --compile` runs)
    update = (CompiledUpdate(opt, backend=BACKEND) if impl == "fastdiff-optimize"
              else lambda lr: opt.step())
    x, _ = _input()
    gen = torch.Generator().manual_seed(0)

    def step():
        loss = diffusion.training_losses(lambda a, b: fn(a, b), x, generator=gen)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        update(1e-4)

    _first_call(benchmark, step)
    benchmark.group = f"e2e train step {PRESET} b{BATCH} {precision}"
    benchmark.extra_info["path"] = path
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=0)
    report.add(benchmark, benchmark.group, impl, baseline=impl.startswith("diffusers"))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", ["fastdiff-optimize", "diffusers-eager", "diffusers-compile"])
def test_ddim(benchmark, report, impl, precision):
    fn, _, path = _plain(impl, precision)
    diffusion = fastdiff.GaussianDiffusion(fastdiff.NoiseSchedule.linear(1000))
    shape = (BATCH, *_input()[0].shape[1:])

    def run():
        return fastdiff.sample(fn, shape=shape, steps=DDIM_TIMED_STEPS, diffusion=diffusion)

    _first_call(benchmark, run)
    benchmark.group = f"e2e DDIM {DDIM_TIMED_STEPS} steps {PRESET} b{BATCH} {precision}"
    benchmark.extra_info["path"] = path
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=0)
    if getattr(benchmark, "stats", None):
        per_step = benchmark.stats.stats.median / DDIM_TIMED_STEPS
        benchmark.extra_info["DDIM-50 images/s"] = round(BATCH / (50 * per_step), 3)
    report.add(benchmark, benchmark.group, impl, baseline=impl.startswith("diffusers"))
