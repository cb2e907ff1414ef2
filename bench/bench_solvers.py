"""Per-step cost of each sampler outside the network (#13): every sampler run with a network that
costs nothing (it returns a fixed tensor), on an image batch, divided by its steps; beside it the
tiny U-Net's forward on the same batch, so the figure that matters is the ratio: how much a
step of each solver adds to one network evaluation.

    pytest bench/bench_solvers.py --benchmark-only

The summary prints two groups: whole runs of STEPS steps (the U-Net line: STEPS forwards), and
"per network evaluation": each run's median divided by the NFE it made, against one U-Net
forward; its "x vs tiny U-Net forward" column is how many times the network's own time exceeds
the solver's overhead per evaluation.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import _machine
import fastdiff

SHAPE = (2, 3, 8, 8) if _machine.SMOKE else (16, 3, 32, 32)
STEPS = 4 if _machine.SMOKE else 20
SAMPLERS = ["ddim", "ddpm", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "dpm_solver_2", "dpm_solver_3", "unipc", "sde", "pc"]


class _FreeNetwork(torch.nn.Module):
    """eps = a fixed tensor: the sampler's own arithmetic is all that is timed."""

    def __init__(self):
        super().__init__()
        self.eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 0.1

    def forward(self, x, t):
        return self.eps


PER_EVAL = f"solver overhead per network evaluation, batch {SHAPE}"


class _PerEvaluation:
    """A finished benchmark's statistics divided by `nfe`, for `report.add`."""

    def __init__(self, benchmark, nfe: int):
        stats = getattr(benchmark, "stats", None)
        if stats is not None:
            self.stats = SimpleNamespace(stats=SimpleNamespace(median=stats.stats.median / nfe))
        self.extra_info = {}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_solver_overhead(benchmark, report, sampler):
    model = _FreeNetwork()
    stats = {}
    benchmark.group = f"solver overhead per run of {STEPS} steps, batch {SHAPE}"
    benchmark(lambda: fastdiff.sample(model, SHAPE, steps=STEPS, sampler=sampler, stats=stats))
    nfe = stats.get("nfe")
    benchmark.extra_info["nfe"] = nfe
    report.add(benchmark, benchmark.group, f"{sampler} ({nfe} NFE)")
    report.add(_PerEvaluation(benchmark, nfe), PER_EVAL, sampler)
    if getattr(benchmark, "stats", None) is not None:
        benchmark.extra_info["us_per_nfe"] = round(benchmark.stats.stats.median / nfe * 1e6, 1)


def test_network_forward(benchmark, report):
    """The tiny U-Net's forward on the same batch, times the steps: what the overheads compare with."""
    net = fastdiff.UNet.preset("tiny", image_size=SHAPE[-1], in_channels=SHAPE[1]).eval()
    x, t = torch.randn(SHAPE), torch.full((SHAPE[0],), 500, dtype=torch.long)
    benchmark.group = f"solver overhead per run of {STEPS} steps, batch {SHAPE}"

    def run():
        with torch.no_grad():
            for _ in range(STEPS):
                net(x, t)
    benchmark(run)
    report.add(benchmark, benchmark.group, f"tiny U-Net x {STEPS}", baseline=True)
    report.add(_PerEvaluation(benchmark, STEPS), PER_EVAL, "tiny U-Net forward", baseline=True)
