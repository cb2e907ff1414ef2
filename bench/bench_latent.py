"""Latent vs pixel sampling time per image (the latent diffusion issue's speed goal: >= 4x at 32x32,
f = 4), on the two networks `fastdiff reproduce` experiment 8 trains, here freshly initialised
(the time of a sampler does not depend on the weights):

    pytest bench/bench_latent.py --benchmark-only
    FASTDIFF_BENCH_THREADS=1 pytest bench/bench_latent.py --benchmark-only   # CPU time, on a busy machine

- `sample`: DDIM-50 (eta 0) of a batch (16 and 128) of 32x32 images: the pixel U-Net, and the latent model
  (its U-Net on 8x8 latents, then the autoencoder's decoder: what `fastdiff.sample` returns);
  extra_info holds the time per image, and the summary the latent model's speed-up;
- `decode`: the decoder alone on the same batch of latents (the latent model's fixed cost);
- each in fp32 (the networks as they are) and bf16 (`fastdiff.optimize(model, precision="bf16",
  compile=False)`: autocast and channels_last for the U-Net and the decoder, no compile: the
  compiled paths and their minutes of compile time are bench_e2e.py's).
Smoke mode (CI) uses experiment 8's quick settings, 2 images and 2 steps.
"""
from __future__ import annotations

import functools

import pytest
import torch

import _machine
import fastdiff
from fastdiff.experiments.reproduce.exp8_latent import EXP8_FULL, EXP8_QUICK, untrained_networks

SETTINGS = EXP8_QUICK if _machine.SMOKE else EXP8_FULL
# per-image times depend on the batch: the latent U-Net's 8x8 tensors leave small batches
# dominated by per-call overhead, while the pixel U-Net's 32x32 activations outgrow the caches at
# large ones (experiment 8 samples 512 in one batch)
BATCHES, STEPS, ROUNDS = ([2], 2, 1) if _machine.SMOKE else ([16, 128], 50, 2)
PRECISIONS = ["fp32", "bf16"]


@functools.lru_cache(maxsize=None)
def _networks():
    return untrained_networks(SETTINGS)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_sample(benchmark, report, kind, precision, batch):
    pixel, latent = _networks()
    model = pixel if kind == "pixel" else latent
    if precision == "bf16":
        model = fastdiff.optimize(model, precision="bf16", compile=False)

    def run():
        return fastdiff.sample(model, n=batch, steps=STEPS, eta=0.0, seed=0)

    x = run()  # warm-up
    assert x.shape == (batch, 3, SETTINGS.image_size, SETTINGS.image_size)
    benchmark.group = f"latent vs pixel: DDIM-{STEPS}, {batch} images {SETTINGS.image_size}x{SETTINGS.image_size} " \
                      f"{precision}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=0)
    if getattr(benchmark, "stats", None):
        benchmark.extra_info["ms per image"] = round(1e3 * benchmark.stats.stats.median / batch, 2)
    report.add(benchmark, benchmark.group, kind, baseline=kind == "pixel")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_decode(benchmark, report, precision):
    batch = BATCHES[-1]
    _, latent = _networks()
    z = torch.randn(batch, *latent.sample_shape, generator=torch.Generator().manual_seed(0))
    model = fastdiff.optimize(latent, precision="bf16", compile=False) if precision == "bf16" else latent

    def run():
        with torch.no_grad():
            return model.decode_latents(z)

    run()
    benchmark.group = f"latent decode, {batch} latents {tuple(latent.sample_shape)} {precision}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=0)
    if getattr(benchmark, "stats", None):
        benchmark.extra_info["ms per image"] = round(1e3 * benchmark.stats.stats.median / batch, 2)
    report.add(benchmark, benchmark.group, "decoder")
