"""End to end against diffusers (#14): the same weights sampled by diffusers' DDIMPipeline and by
`fastdiff.sample` on the folder imported with `fastdiff.load_model`.

    pytest bench/bench_diffusers_pipeline.py --benchmark-only
    FASTDIFF_BENCH_PIPELINE_STEPS=10 pytest bench/bench_diffusers_pipeline.py --benchmark-only   # quicker

The ddpm-cifar10 configuration (google/ddpm-cifar10-32's UNet2DModel config, random weights, nothing
downloaded), batch 16, DDIM with 50 steps (eta = 0, leading spacing, clip_sample=False so both take the
same arithmetic path), in fp32 and in bf16 (weights and samples in bf16 for both; fastdiff-optimize is
`fastdiff.optimize(model, precision)`, what `fastdiff sample --fast` runs: fp32 weights under bf16
autocast, compiled with freezing; its compilation happens in the untimed warm-up). Reported: images/s
and, in the summary, fastdiff's ratio to diffusers; extra_info holds the largest pixel difference
between the two implementations' images (0-1 scale). Skipped without diffusers (`pip install
fastdiff[bench]`).
"""
from __future__ import annotations

import os

import pytest
import torch

import _machine
import fastdiff

STEPS = int(os.environ.get("FASTDIFF_BENCH_PIPELINE_STEPS", "50"))
BATCH = 16
# google/ddpm-cifar10-32 (Ho et al.'s CIFAR-10 network, 35.7M parameters)
CIFAR10 = dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
               norm_num_groups=32, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
if _machine.SMOKE:
    CIFAR10 = dict(CIFAR10, sample_size=8, block_out_channels=(16, 32, 32, 32), norm_num_groups=8, layers_per_block=1)
    STEPS, BATCH = 2, 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**CIFAR10)
    path = tmp_path_factory.mktemp("ddpm-cifar10")
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    diffusers.DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


def _images(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("impl", ["fastdiff", "fastdiff-optimize", "diffusers"])
def test_ddim_pipeline(benchmark, report, folder, impl, precision):
    import diffusers

    dtype = DTYPES[precision]
    size = CIFAR10["sample_size"]
    if impl == "diffusers":
        pipe = diffusers.DDIMPipeline.from_pretrained(folder).to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)

        def run():
            out = pipe(batch_size=BATCH, generator=torch.Generator().manual_seed(0), eta=0.0,
                       num_inference_steps=STEPS, output_type="pt").images
            return out.permute(0, 2, 3, 1)
    else:
        model, _ = fastdiff.load_model(folder)
        if impl == "fastdiff-optimize":  # what `fastdiff sample --fast` runs: fp32 weights, bf16 autocast
            backend = "inductor" if not _machine.SMOKE else "eager"
            model, dtype = fastdiff.optimize(model, precision=precision, backend=backend), torch.float32
        else:
            model = model.to(dtype)
        x_T = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)

        def run():
            return _images(fastdiff.sample(model, x_T=x_T, steps=STEPS))

    with torch.no_grad():
        images = run()  # warm-up
    benchmark.group = f"diffusers pipeline: ddpm-cifar10 DDIM-{STEPS} b{BATCH} {precision}"
    benchmark.pedantic(run, rounds=1 if STEPS >= 50 else 3, warmup_rounds=0)
    if getattr(benchmark, "stats", None):
        benchmark.extra_info["images/s"] = round(BATCH / benchmark.stats.stats.median, 3)
    _IMAGES[(impl, precision)] = images
    other = _IMAGES.get(("fastdiff" if impl == "diffusers" else "diffusers", precision))
    if other is not None:
        benchmark.extra_info["max pixel difference"] = float((images.float() - other.float()).abs().max())
    report.add(benchmark, benchmark.group, impl, baseline=impl == "diffusers")
    if impl == "fastdiff-optimize":
        benchmark.extra_info["compile"] = "first call (warm-up) compiles; not timed"


_IMAGES: dict = {}
