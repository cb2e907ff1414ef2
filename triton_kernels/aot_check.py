"""Compile every Triton kernel for a GPU target on a machine without a GPU.

    python -m fastdiff.triton_kernels.aot_check [--arch 90] [--full] [--no-spill-check]

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, but not that they
compile: it accepts things the compiler rejects (non-constexpr globals, `.to()` on an
integer argument that Triton specialises to the constant 1, layouts, shared memory). This
tool runs the real launchers on small CPU tensors with Triton's driver replaced by a stub
whose target is `cuda:<arch>`, so each launch goes through Triton's own argument binding
and specialisation, then the full compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the
ptxas bundled in the triton wheel) instead of a launch. Nothing runs on a device.
Each kernel's PTX then goes through that ptxas with -v: a kernel that spills registers to
local memory, or needs more than SHARED_BUDGET bytes of shared memory (two blocks per SM on
sm_90), fails the check.

Do not import this module in a process that runs Triton kernels: it swaps the driver.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, List, Tuple

import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("aot_check compiles kernels; run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver as _triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _StubDriver:
    """Enough of a Triton driver for binding and compiling; launching is not possible."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return None

    def get_benchmarker(self):  # pragma: no cover - not used
        raise RuntimeError("no benchmarking without a GPU")


# Largest dynamic shared memory per block (bytes) with the opt-in, per compute capability.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
# What a kernel may use: at most half of an SM's shared memory, so that two blocks fit.
SHARED_BUDGET = 116 * 1024


def ptxas_usage(ptx: str, arch: int) -> Tuple[int, int]:
    """(registers per thread, spill-store bytes) that ptxas reports for one kernel's PTX."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", "--gpu-name", gpu, src, "-o", os.path.join(tmp, "kernel.o")],
                              capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = re.search(r"(\d+) bytes spill stores", proc.stderr)
    return int(regs.group(1)) if regs else 0, int(spills.group(1)) if spills else 0


def _install(arch: int, compiled: List[Tuple[str, int]], spill_check: bool = True):
    """Stub the driver and make `kernel[grid](...)` compile (warm-up) instead of launching."""
    _triton_driver.set_active(_StubDriver(arch))

    def getitem(self, grid):
        def compile_only(*args, **kwargs):
            if len(grid) > 1 and any(g > 65535 for g in grid[1:]):
                raise RuntimeError(f"{self.fn.__name__}: grid {grid} exceeds 65,535 on axis 1 or 2")
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            shared = int(kernel.metadata.shared)
            limit = min(MAX_SHARED.get(arch, 101376), SHARED_BUDGET)
            if shared > limit:
                raise RuntimeError(f"{self.fn.__name__} needs {shared} bytes of shared memory; the budget on "
                                   f"sm_{arch} is {limit}")
            if spill_check:
                regs, spills = ptxas_usage(kernel.asm["ptx"], arch)
                if spills:
                    raise RuntimeError(f"{self.fn.__name__} spills {spills} bytes of registers per thread on "
                                       f"sm_{arch} ({regs} registers)")
            compiled.append((self.fn.__name__, shared))

        return compile_only

    JITFunction.__getitem__ = getitem


def _cases(full: bool) -> List[Tuple[str, Callable[[], object]]]:
    """Launcher calls covering every kernel and the specialisations that matter."""
    from fastdiff.triton_kernels import attention as ta
    from fastdiff.triton_kernels import group_norm_silu as tg
    from fastdiff.triton_kernels import sampler_step as ts

    cases = []
    step_dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64] if full else \
        [torch.float16, torch.float64]
    for dtype in step_dtypes:
        for mode in ((0, 1, 2) if full else (0, 2)):
            x = torch.zeros(2, 3, 4, 4, dtype=dtype)
            out = torch.zeros(2, 3 * (2 if mode else 1), 4, 4, dtype=dtype)
            cases.append((f"sampler_step {dtype} mode {mode}",
                          lambda x=x, out=out, mode=mode: ts.sampler_step_triton(x, out, [1.0] * 7, 2**32 + 1, 1, 1,
                                                                                 True, mode)))
    x = torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16)
    table = torch.zeros(3, 7, dtype=torch.float64)
    cases.append(("sampler_step_table bf16", lambda: ts.sampler_step_table_triton(
        x, x, table, torch.tensor(1), 1, 0, False, 0)))
    cases.append(("randn fp32 (key_hi = 1)", lambda: ts.randn_triton((2, 5), 2**32 + 1, 1, 1, device="cpu")))
    cases.append(("philox bits", lambda: ts.philox_bits_triton(torch.zeros(4, 3, dtype=torch.int64), 2**32 + 1)))

    gn_dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64] if full else [torch.bfloat16]
    for dtype in gn_dtypes:
        for channels_last in (False, True):
            for n, c, s, g in ([(2, 64, 16, 32), (1, 8, 1, 1)] if full else [(2, 64, 16, 32)]):
                x3 = torch.zeros(n, c, s, dtype=dtype)
                if channels_last:
                    x3 = x3.transpose(1, 2).contiguous().transpose(1, 2)
                label = f"group_norm_silu {dtype} {'NSC' if channels_last else 'NCS'} S={s}"

                def gn(x3=x3, g=g):
                    y, mean, rstd = tg.group_norm_silu_fwd_triton(x3, None, None, g, 1e-5, True)
                    tg.group_norm_silu_bwd_triton(torch.zeros_like(x3), x3, None, None, mean, rstd, g, 1e-5, True)

                cases.append((label, gn))
    if not full:  # the S = 1 specialisation (S becomes the constant 1)
        x1 = torch.zeros(2, 8, 1)
        cases.append(("group_norm_silu fp32 S=1", lambda: tg.group_norm_silu_fwd_triton(x1, None, None, 4, 1e-5,
                                                                                       False)))

    # fp32 at D = 256 is what ddpm-cifar10 sampling runs; fp32 D = 64 spilled with the old tiles
    attn = [(torch.float16, 64), (torch.float32, 8), (torch.bfloat16, 256), (torch.float32, 256),
            (torch.float32, 64)]
    if full:
        attn += [(torch.float16, 8), (torch.float16, 40), (torch.float16, 128), (torch.float16, 256),
                 (torch.float32, 128), (torch.bfloat16, 64)]
    for dtype, d in attn:
        q = torch.zeros(2, 2, 33, d, dtype=dtype)

        def at(q=q):
            out, lse = ta.attention_fwd_triton(q, q, q, 0.125)
            ta.attention_bwd_triton(q, q, q, q, out, lse, 0.125)

        cases.append((f"attention {dtype} D={d}", at))
    return cases


def run(arch: int = 90, full: bool = False, verbose: bool = True, spill_check: bool = True) -> List[Tuple[str, int]]:
    """Compile the cases; returns (kernel name, shared memory bytes) per compiled launch."""
    compiled: List[Tuple[str, int]] = []
    _install(arch, compiled, spill_check)
    for label, call in _cases(full):
        before = len(compiled)
        start = time.perf_counter()
        call()
        if verbose:
            kernels = ", ".join(f"{name} ({shared // 1024} KiB smem)" for name, shared in compiled[before:])
            print(f"ok  {label}: {kernels} ({time.perf_counter() - start:.1f} s)", flush=True)
    return compiled


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10, e.g. 80 or 90 (default 90)")
    p.add_argument("--full", action="store_true", help="every dtype / mode / head dim, not a representative set")
    p.add_argument("--no-spill-check", action="store_true", help="do not run ptxas -v on each kernel")
    args = p.parse_args(argv)
    compiled = run(args.arch, args.full, spill_check=not args.no_spill_check)
    print(f"compiled {len(compiled)} kernel specialisations for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
