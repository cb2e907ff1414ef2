"""The machine's limits, measured once per session, for "fraction of the limit" figures."""
from __future__ import annotations

import functools
import os
import time

import torch

#: FASTDIFF_BENCH_SMOKE=1: every benchmark runs on tiny sizes (with --benchmark-disable, once and
#: untimed). CI runs this (bench/ci_smoke.sh) so that a benchmark that no longer runs fails CI;
#: the figures come from full-size runs only.
SMOKE = os.environ.get("FASTDIFF_BENCH_SMOKE") == "1"


def _clock():
    """Wall time; CPU time in the one-thread mode (FASTDIFF_BENCH_THREADS=1), where the
    benchmarks time CPU time too so that other tenants of a shared machine drop out."""
    return time.process_time if os.environ.get("FASTDIFF_BENCH_THREADS") == "1" else time.perf_counter


def _median_time(fn, repeats: int) -> float:
    clock = _clock()
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    times.sort()
    return times[len(times) // 2]


@functools.lru_cache(maxsize=None)
def memory_bandwidth_gbs(device: str = "cpu") -> float:
    """Bytes moved per second by a large tensor copy (read + write), all threads: the
    practical ceiling for a memory-bound kernel."""
    n = 64 * 2**20 // 4 if device == "cpu" else 1024 * 2**20 // 4  # 64 MiB on the CPU: past L3
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize()

    return 2 * src.numel() * src.element_size() / _median_time(copy, 15) / 1e9


@functools.lru_cache(maxsize=None)
def matmul_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """fp32 (or `dtype`) GEMM throughput at a size where BLAS is at its best."""
    n = 1024 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def mm():
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()

    return 2 * n ** 3 / _median_time(mm, 5) / 1e9


@functools.lru_cache(maxsize=None)
def conv_gflops(dtype: torch.dtype = torch.float32) -> float:
    """A large channels_last 3x3 convolution (256 -> 256 channels, 32x32, batch 8) in `dtype`,
    under no_grad: oneDNN's best case on the CPU, at times above its GEMM (AMX bf16)."""
    x = torch.randn(8, 256, 32, 32).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)

    def conv():
        with torch.no_grad():
            torch.nn.functional.conv2d(x, w, padding=1)

    return 2 * 8 * 256 * 256 * 9 * 32 * 32 / _median_time(conv, 5) / 1e9


def peak_gflops(dtype: torch.dtype = torch.float32) -> float:
    """The machine's measured FLOP/s limit in `dtype`: the better of a large GEMM (2048^2,
    past the size where BLAS peaks) and a large convolution, measured in this session."""
    n = 512 if SMOKE else 2048
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    gemm = 2 * n ** 3 / _median_time(lambda: torch.mm(a, b), 5) / 1e9
    return max(gemm, conv_gflops(dtype))


def describe() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
