"""Shared benchmark plumbing: a `report` fixture collecting medians, printed at the end as
ratios against the baselines (torch eager, torch.compile) and as fractions of the
machine's limits (bench/_machine.py)."""
from __future__ import annotations

import collections
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import _machine  # noqa: E402

_rows = collections.OrderedDict()

# FASTDIFF_BENCH_THREADS=N runs every benchmark on N threads; N=1 also times CPU time
# (time.process_time) instead of wall time, so other tenants of a shared machine drop out.
_THREADS = os.environ.get("FASTDIFF_BENCH_THREADS")
if _THREADS:
    torch.set_num_threads(int(_THREADS))


def pytest_collection_modifyitems(items):
    if _THREADS == "1":
        for item in items:
            item.add_marker(pytest.mark.benchmark(timer=time.process_time))


class Report:
    def add(self, benchmark, group: str, name: str, bytes_moved: float = None, flops: float = None,
            baseline: bool = False, peak: tuple = None):
        """Record benchmark's median under (group, name) once it has run. peak = (label, GFLOP/s):
        the FLOP/s limit to compare with (default: the fp32 matmul)."""
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: the function ran once, untimed
            return
        median = stats.stats.median
        _rows.setdefault(group, collections.OrderedDict())[name] = (median, bytes_moved, flops, baseline, peak)
        if bytes_moved:
            benchmark.extra_info["GB/s"] = round(bytes_moved / median / 1e9, 2)
        if flops:
            benchmark.extra_info["GFLOP/s"] = round(flops / median / 1e9, 2)


@pytest.fixture(scope="session")
def report():
    return Report()


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    tr = terminalreporter
    bw = _machine.memory_bandwidth_gbs()
    mm = _machine.matmul_gflops()
    tr.section("fastdiff: medians, ratios and fractions of the machine's limits")
    tr.write_line(f"machine: {_machine.describe()}; copy bandwidth {bw:.1f} GB/s; fp32 matmul {mm:.1f} GFLOP/s")
    for group, rows in _rows.items():
        baselines = {n: r[0] for n, r in rows.items() if r[3]}
        tr.write_line(f"\n[{group}]")
        for name, (median, bytes_moved, flops, _, peak) in rows.items():
            parts = [f"  {name:<28} {median * 1e6:>11.1f} us"]
            for bname, bmedian in baselines.items():
                if bname != name:
                    parts.append(f"{bmedian / median:6.2f}x vs {bname}")
            if bytes_moved:
                gbs = bytes_moved / median / 1e9
                parts.append(f"{gbs:7.1f} GB/s = {100 * gbs / bw:5.1f}% of copy bandwidth")
            if flops:
                gf = flops / median / 1e9
                label, limit = peak or ("fp32 matmul", mm)
                parts.append(f"{gf:7.1f} GFLOP/s = {100 * gf / limit:5.1f}% of {label}")
            tr.write_line("  ".join(parts))
