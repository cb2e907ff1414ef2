"""`fastdiff sample --fast [auto|fp32|bf16]`: sample through fastdiff.optimize (compiled with
inductor freezing, channels_last, bf16 where the hardware has it). The images differ from the
plain path by rounding (bf16: see tests/test_optimize.py's quality guard), so --fast is opt-in."""
from __future__ import annotations

import argparse

COMPILE_NOTE = ("the first forward compiles the network (about a minute or more for the CIFAR-10 U-Net on "
                "2 CPU cores; later processes reuse inductor's cache, TORCHINDUCTOR_CACHE_DIR), so --fast pays "
                "off for hundreds of forward passes, not a handful")


def add_fast_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast", nargs="?", const="auto", choices=("auto", "fp32", "bf16"), default=None,
                   help="compile the model with fastdiff.optimize; auto = bf16 where the CPU/GPU has native "
                   "bf16, else fp32. " + COMPILE_NOTE)


def optimize_for(model, a: argparse.Namespace, log=print):
    """The model `fastdiff sample` runs: optimized when --fast is given."""
    choice = getattr(a, "fast", None)
    if not choice:
        return model
    import torch

    from fastdiff.optimization import native_bf16, optimize

    device = next(model.parameters()).device
    precision = choice if choice != "auto" else ("bf16" if native_bf16(torch.device(device)) else "fp32")
    fast = optimize(model, precision=precision)
    log(f"--fast: {fast.path}; {COMPILE_NOTE}")
    return fast


def report_compile(model, log=print) -> None:
    seconds = getattr(model, "first_call_seconds", None)
    if seconds is not None:
        log(f"--fast: the first forward (compilation included) took {seconds:.1f}s")
