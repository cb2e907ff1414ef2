"""The U-Net end to end on the CPU: DDIM sampling and training-step throughput.

    pytest bench/bench_unet.py --benchmark-only
    FASTDIFF_BENCH_THREADS=1 pytest bench/bench_unet.py --benchmark-only   # one thread, CPU time

The second form (as bench_group_norm_silu.py) times process CPU time on one thread, so that
the other tenants of a shared machine drop out of the figures.

For each preset (ddpm-cifar10 at batch 8, small at batch 16) and precision (fp32;
bf16 autocast + channels_last):
- `train`: one training step (forward, backward, AdamW), the hybrid of what `fastdiff train` does;
- `ddim`: DDIM sampling, timed over a few steps and reported per DDIM-50 run (images/s of
  DDIM-50 = batch / (50 x seconds per step)).
Implementations: `fastdiff` (fused ops, default backend), `reference` (the same network with
`fastdiff.ops.use_backend("reference")`: pure-torch ops), and diffusers' UNet2DModel of the same
configuration when diffusers is installed (`pip install fastdiff[bench]`; skipped otherwise).
"""
from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch

import _machine
import fastdiff
from fastdiff.models.unet import UNet

if os.environ.get("FASTDIFF_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTDIFF_BENCH_THREADS"]))
if os.environ.get("FASTDIFF_BENCH_THREADS") == "1":
    pytestmark = pytest.mark.benchmark(timer=time.process_time)

CASES = [("ddpm-cifar10", 8), ("small", 16)]
PRECISIONS = ["fp32", "bf16-cl"]
# DDIM steps actually timed per round (each is one model forward plus one fused step).
TIMED_STEPS = {"ddpm-cifar10": 3, "small": 5, "tiny": 2}
if _machine.SMOKE:
    CASES = [("tiny", 2)]
ROUNDS = 3


def _precision_ctx(precision: str):
    if precision == "bf16-cl":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _backend_ctx(impl: str):
    return fastdiff.ops.use_backend("reference") if impl == "reference" else contextlib.nullcontext()


def _diffusers_unet(preset: str):
    diffusers = pytest.importorskip("diffusers")
    cfg = UNet.preset(preset).config
    widths = tuple(cfg["model_channels"] * m for m in cfg["channel_mult"])
    size = cfg["image_size"]
    down, up = [], []
    for i in range(len(widths)):
        attn = (size // 2 ** i) in cfg["attention_resolutions"]
        down.append("AttnDownBlock2D" if attn else "DownBlock2D")
    up = ["AttnUpBlock2D" if d == "AttnDownBlock2D" else "UpBlock2D" for d in reversed(down)]
    return diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=widths,
                                 layers_per_block=cfg["num_res_blocks"], down_block_types=tuple(down),
                                 up_block_types=tuple(up), norm_num_groups=cfg["num_groups"],
                                 dropout=cfg["dropout"], attention_head_dim=None)


class _DiffusersAsEps(torch.nn.Module):
    """diffusers' model with fastdiff's call signature model(x, t) -> eps."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.sample_shape = (3, net.config.sample_size, net.config.sample_size)

    def forward(self, x, t):
        return self.net(x, t).sample


def _model(impl: str, preset: str, precision: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = _DiffusersAsEps(_diffusers_unet(preset)) if impl == "diffusers" else UNet.preset(preset)
    if precision == "bf16-cl":
        model = model.to(memory_format=torch.channels_last)
    return model


def _batch(batch: int, precision: str):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
    if precision == "bf16-cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("preset,batch", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["fastdiff", "reference", "diffusers"])
def test_train_step(benchmark, report, impl, preset, batch, precision):
    model = _model(impl, preset, precision).train()
    diffusion = fastdiff.GaussianDiffusion(fastdiff.NoiseSchedule.linear(1000))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = _batch(batch, precision)
    gen = torch.Generator().manual_seed(0)

    def step():
        with _backend_ctx(impl):
            with _precision_ctx(precision):
                loss = diffusion.training_losses(lambda a, b: model(a, b).float(), x, generator=gen)["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    step()  # warm-up: allocations, kernel selection
    benchmark.group = f"unet {preset} train step b{batch} {precision}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=0)
    benchmark.extra_info["images/s"] = round(batch / benchmark.stats.stats.median, 2) \
        if getattr(benchmark, "stats", None) else None
    report.add(benchmark, benchmark.group, impl, baseline=impl != "fastdiff")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("preset,batch", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["fastdiff", "reference", "diffusers"])
def test_ddim_sampling(benchmark, report, impl, preset, batch, precision):
    model = _model(impl, preset, precision).eval()
    steps = TIMED_STEPS[preset]
    diffusion = fastdiff.GaussianDiffusion(fastdiff.NoiseSchedule.linear(1000))
    memory_format = torch.channels_last if precision == "bf16-cl" else torch.contiguous_format

    def net(x, t):
        with _precision_ctx(precision):
            return model(x.contiguous(memory_format=memory_format), t).float()

    def run():
        with _backend_ctx(impl):
            return fastdiff.sample(net, shape=(batch, 3, 32, 32), steps=steps, eta=0.0, diffusion=diffusion)

    run()
    benchmark.group = f"unet {preset} DDIM {steps} steps b{batch} {precision}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=0)
    if getattr(benchmark, "stats", None):
        per_step = benchmark.stats.stats.median / steps
        benchmark.extra_info["DDIM-50 images/s"] = round(batch / (50 * per_step), 3)
    report.add(benchmark, benchmark.group, impl, baseline=impl != "fastdiff")
