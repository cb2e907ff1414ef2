"""`fastdiff sample --fast [auto|fp32|bf16]`: sample through fastdiff.optimize (compiled with
inductor freezing, channels_last, bf16 where the hardware has it). The images differ from the
plain path by rounding (bf16: see tests/test_optimize.py's quality guard), so --fast is opt-in.

Compiling costs time before the first image, so `--fast auto` decides: it times one eager
forward pass of the model at the sampling batch, estimates the compile time from the figures
measured below (scaled by the network's size), and compiles only when the passes the command
will run save more than that; it prints the decision and the figures behind it. `--fast fp32` /
`--fast bf16` always compile (and say how long it should take). A package written by `fastdiff
export --compiled` (.pt2) is already compiled: it loads in seconds and never compiles.
"""
from __future__ import annotations

import argparse
import math
import time

# Measured on this project's 2-core CPU machine, 1 thread (OMP_NUM_THREADS=1), torch 2.13, while
# other jobs ran (load average ~7: an idle machine compiles faster, so `auto` errs towards eager);
# bench/compile_cost.py, its docstring gives the commands. The ddpm-cifar10 U-Net (35.7M
# parameters in 304 tensors), batch 8, fp32, fastdiff.optimize (inductor, freezing, fullgraph):
REFERENCE_NETWORK = "ddpm-cifar10"
REFERENCE_PARAMETER_TENSORS = 304        # len(list(UNet.preset("ddpm-cifar10").parameters()))
COMPILE_SECONDS_FIRST = 437.0            # first call, first process (empty TORCHINDUCTOR_CACHE_DIR)
COMPILE_SECONDS_CACHED = 75.0            # first call, second process: dynamo traces again, inductor's cache
                                         # serves the compiled graphs
COMPILED_PASS_FRACTION = 0.79            # a compiled pass took 0.79 of an eager one (5.50 / 6.94 s, 3.48 / 4.36 s)

COMPILE_NOTE = (f"compiling the network takes ~{COMPILE_SECONDS_FIRST:.0f}s for the {REFERENCE_NETWORK} U-Net "
                f"on one thread of a busy 2-core CPU in the first process and ~{COMPILE_SECONDS_CACHED:.0f}s in later ones (inductor's "
                "cache, TORCHINDUCTOR_CACHE_DIR); a `fastdiff export --compiled` package loads without compiling")


def add_fast_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast", nargs="?", const="auto", choices=("auto", "fp32", "bf16"), default=None,
                   help="run the model through fastdiff.optimize (torch.compile with freezing, channels_last, bf16 "
                   "where the CPU/GPU has it natively). auto: compile only when this command's forward passes save "
                   "more time than compiling costs (it prints the estimate and the decision); fp32/bf16: always "
                   "compile, in that precision. " + COMPILE_NOTE)


def compile_estimate(model) -> tuple:
    """(first-process seconds, cached seconds) to compile `model`: the measured figures of the
    reference network scaled by the number of parameter tensors (the graph's size, which is what
    tracing and code generation scale with, far more than with the parameter count)."""
    scale = max(1, sum(1 for _ in model.parameters())) / REFERENCE_PARAMETER_TENSORS
    return COMPILE_SECONDS_FIRST * scale, COMPILE_SECONDS_CACHED * scale


def forward_passes(a: argparse.Namespace, n: int) -> int:
    """Network evaluations `fastdiff sample` will run: steps x batches (x2 for Heun's two stages;
    the adaptive ODE sampler's count is unknown in advance: its steps are taken as a guess)."""
    per_step = 2 if getattr(a, "sampler", "ddim") in ("heun", "dpm_solver_2") else \
        3 if getattr(a, "sampler", "ddim") == "dpm_solver_3" else 1
    return a.steps * per_step * math.ceil(n / a.batch_size)


def time_eager_pass(model, batch_size: int, guided: bool) -> float:
    """Seconds of one eager forward pass at the sampling batch (doubled for guidance)."""
    import torch

    device = next(model.parameters()).device
    b = batch_size * (2 if guided else 1)
    x = torch.randn(b, *model.sample_shape, device=device)
    t = torch.full((b,), model.diffusion.T - 1, dtype=torch.long, device=device)
    kw = {"y": torch.zeros(b, dtype=torch.long, device=device)} if model.num_classes else {}
    with torch.no_grad():
        start = time.perf_counter()
        model(x, t, **kw)
    return time.perf_counter() - start


def decide(passes: int, eager_seconds: float, compile_seconds: float) -> tuple:
    """(compile?, the sentence that says why): compile when the passes' expected saving exceeds
    the compile time."""
    saving = passes * eager_seconds * (1.0 - COMPILED_PASS_FRACTION)
    figures = (f"{passes} forward passes at ~{eager_seconds:.2f}s eager = ~{passes * eager_seconds:.0f}s; compiling "
               f"costs ~{compile_seconds:.0f}s (first process) and saves ~{(1 - COMPILED_PASS_FRACTION) * 100:.0f}% "
               f"per pass = ~{saving:.0f}s")
    if saving > compile_seconds:
        return True, f"{figures}: compiling"
    return False, f"{figures}: not worth it, running eager (--fast fp32 / bf16 compiles anyway)"


def optimize_for(model, a: argparse.Namespace, log=print, n: int = None):
    """The model `fastdiff sample` runs: optimized when --fast is given (and, for auto, pays)."""
    choice = getattr(a, "fast", None)
    description = getattr(model, "path_description", None)
    if description:  # a compiled package: nothing to compile
        log(f"model: {description}" + ("; --fast has nothing to add" if choice else ""))
        return model
    if not choice:
        return model
    import torch

    from fastdiff.optimization import native_bf16, optimize

    device = next(model.parameters()).device
    first, cached = compile_estimate(model)
    if choice == "auto":
        w = getattr(a, "guidance_scale", None)
        guided = bool(model.num_classes) and (w if w is not None else getattr(model, "default_guidance_scale", 0)) > 0
        if n is None:
            per_class = getattr(a, "per_class", None)
            n = per_class * model.num_classes if per_class and model.num_classes else a.n
        passes = forward_passes(a, n)
        go, why = decide(passes, time_eager_pass(model, a.batch_size, guided), first)
        log(f"--fast auto: {why}")
        if not go:
            return model
    precision = choice if choice != "auto" else ("bf16" if native_bf16(torch.device(device)) else "fp32")
    fast = optimize(model, precision=precision)
    log(f"--fast: {fast.path}; the first forward compiles (~{first:.0f}s estimated; ~{cached:.0f}s when inductor's "
        "cache, TORCHINDUCTOR_CACHE_DIR, holds this network from an earlier process)")
    return fast


def report_compile(model, log=print) -> None:
    seconds = getattr(model, "first_call_seconds", None)
    if seconds is not None:
        log(f"--fast: the first forward (compilation included) took {seconds:.1f}s")
