"""`fastdiff demo`: train a small class-conditional model on the embedded shapes within a
wall-clock budget, sample it, and write what a person wants to look at (a grid, a loss curve,
the measured speed)."""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fastdiff import ops
from fastdiff.data import SHAPE_CLASSES, to_uint8
from fastdiff.image_utils import save_image_grid
from fastdiff.models.unet import UNet
from fastdiff.runtime import free_threads
from fastdiff.sampling import sample
from fastdiff.train import TrainConfig, build_diffusion, load_checkpoint, train


DDIM_STEPS = 50


def _class_grid(model, n: int, seed: int, path: Path, scale: int):
    """n DDIM-50 samples at the model's default guidance, sample i of class (i // C) % C (C classes), saved
    as a grid with one row per class; (samples, labels, seconds of sampling)."""
    num_classes = len(SHAPE_CLASSES)
    labels = (torch.arange(n) // num_classes) % num_classes
    t0 = time.time()
    x = sample(model, n=n, steps=DDIM_STEPS, eta=0.0, seed=seed, y=labels, guidance_scale=model.default_guidance_scale,
               progress=True)
    seconds = time.time() - t0
    save_image_grid(x, path, nrow=min(num_classes, n), scale=scale)
    return x, labels, seconds


def _sampling_seconds(config: TrainConfig, n: int, num_classes: int) -> tuple:
    """(estimated seconds of the final DDIM-50 grid, parameter count): one sampling forward
    pass of the real network at the grid's batch, timed, x 50 steps x 1.5, plus a margin."""
    size = config.image_size
    probe = UNet.preset(config.preset, num_classes=num_classes, diffusion=build_diffusion(config), image_size=size,
                        **config.model).eval()
    with torch.no_grad():
        rows = 2 * n if config.resolved_guidance_scale > 0 else n  # guidance: both branches in one batch
        xb, tb = torch.randn(rows, 3, size, size), torch.full((rows,), 500)
        yb = torch.arange(rows) % (num_classes + 1)
        probe(xb, tb, y=yb)  # first call: allocator and kernel set-up
        best = math.inf
        for _ in range(2):
            t0 = time.time()
            probe(xb, tb, y=yb)
            best = min(best, time.time() - t0)
    return 1.5 * DDIM_STEPS * best + 5.0, probe.num_parameters()


def _write_readme(out_dir: Path, speed: dict, config: TrainConfig, params: int, minutes_trained: float) -> None:
    rows = "\n".join(f"| {i} | {name} |" for i, name in enumerate(SHAPE_CLASSES))
    size = config.image_size
    (out_dir / "README.md").write_text(
        f"# fastdiff demo\n\nA {params / 1e6:.2f}M-parameter class-conditional U-Net "
        f"({size}x{size}, v-prediction, cosine schedule) trained for "
        f"{speed['train_steps']} steps ({minutes_trained:.1f} min, batch {config.batch_size}) on the embedded "
        f"`shapes` data, sampled with DDIM-{DDIM_STEPS} (eta 0, EMA weights, classifier-free guidance "
        f"w = {speed['guidance_scale']:g}). Row k of the grid is class k.\n\n"
        f"![samples](samples.png)\n\n![loss](loss.png)\n\n| row | class |\n|---|---|\n{rows}\n\n"
        f"## Speed\n\n| measure | value |\n|---|---|\n"
        + "".join(f"| {k} | {v} |\n" for k, v in speed.items()))


def run_demo(out: str = "fastdiff-demo", minutes: float = 9.0, preset: Optional[str] = None, batch_size: int = 32,
             n: int = 100, seed: int = 0, lr: float = 2e-3, dataset_size: int = 10000, fp32: bool = False,
             image_size: int = 16, threads: Optional[int] = None) -> dict:
    """Train a class-conditional U-Net on the embedded shapes within `minutes` of wall clock
    (sampling included), then draw an n-image DDIM-50 grid, one row per class, at the
    model's default classifier-free guidance scale. Training runs under bf16 autocast with
    channels_last unless fp32 (about 2x the steps on CPUs with bf16 instructions; the
    weights and the optimizer stay fp32).

    The shapes are rendered at image_size=16 by default: every class stays recognisable
    (see fastdiff.data.make_shapes) at a quarter of the 32x32 cost, which is what lets a
    2-core CPU train to clean samples in minutes; image_size=32 for the full resolution.
    v-prediction with the cosine schedule gives clean samples earliest in such short runs."""
    t_begin = time.time()
    torch.set_num_threads(threads if threads is not None else free_threads(announce="fastdiff demo"))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(data="shapes", out=str(out_dir), steps=10 ** 7, preset=preset or "demo", batch_size=batch_size,
                         seed=seed, lr=lr, warmup_steps=100, ema_rate=0.999, class_cond=True, p_uncond=0.1,
                         image_size=image_size, prediction="v", schedule="cosine",
                         dataset_size=dataset_size, save_every=250, sample_at_end=False, model={},
                         log_every=10, bf16=not fp32, channels_last=not fp32, overwrite=True)
    num_classes = len(SHAPE_CLASSES)
    sample_estimate, params = _sampling_seconds(config, n, num_classes)
    # the rest of the margin: generating the data (~0.6 ms an image) and the final save
    train_seconds = 60.0 * minutes - (time.time() - t_begin) - sample_estimate - 5.0 - 6e-4 * dataset_size
    if train_seconds < 5:
        print(f"fastdiff demo: warning: --minutes {minutes:g} is too short (sampling alone needs about "
              f"{sample_estimate:.0f}s); training for 5 s anyway", file=sys.stderr)
        train_seconds = 5.0
    config.max_minutes = train_seconds / 60.0
    print(f"fastdiff demo: training a {params / 1e6:.2f}M-parameter U-Net on the embedded shapes for "
          f"{train_seconds / 60:.1f} min (of a {minutes:g} min budget), then DDIM-{DDIM_STEPS} sampling "
          f"{n} images (about {sample_estimate:.0f}s) into {out_dir}", flush=True)
    result = train(config)
    print(f"fastdiff demo: {result.step} steps at {result.steps_per_s:.2f} steps/s "
          f"({result.samples_per_s:.1f} images/s); sampling...", flush=True)
    model, _ = load_checkpoint(out_dir, ema=True)
    w = model.default_guidance_scale
    x, labels, sample_seconds = _class_grid(model, n, seed, out_dir / "samples.png", scale=max(2, 96 // image_size))
    np.savez(out_dir / "samples.npz", images=to_uint8(x).permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
    total = time.time() - t_begin
    speed = {
        "train_steps": result.step, "train_seconds": round(result.seconds, 1),
        "train_steps_per_s": round(result.steps_per_s, 3), "train_images_per_s": round(result.samples_per_s, 2),
        "batch_size": batch_size, "image_size": image_size, "precision": "fp32" if fp32 else "bf16 autocast + channels_last",
        "sampler": f"DDIM-{DDIM_STEPS}, eta=0 (fp32)", "guidance_scale": w, "sample_images": n,
        "sample_seconds": round(sample_seconds, 1), "sample_images_per_s": round(n / sample_seconds, 3),
        "total_seconds": round(total, 1), "parameters": params, "final_loss": round(float(np.mean(
            [l for _, l in result.losses[-50:]])), 4) if result.losses else None,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or
        platform.machine(), "backend": ops.current_backend(),
    }
    (out_dir / "speed.json").write_text(json.dumps(speed, indent=1) + "\n")
    _write_readme(out_dir, speed, config, params, result.seconds / 60)
    print(f"fastdiff demo: done in {total / 60:.1f} min: {out_dir / 'samples.png'} (row k = {', '.join(SHAPE_CLASSES)}), "
          f"{out_dir / 'loss.png'}, {out_dir / 'speed.json'}, {out_dir / 'README.md'}")
    return speed


# --------------------------------------------------------------------------- fastdiff demo --latent
#: the demo's autoencoder (f = 4, 8 latent channels): that of tests/data/shapes32-ae
LATENT_DEMO_AUTOENCODER = dict(block_out_channels=(32, 32, 64), latent_channels=8, norm_num_groups=8, loss="l2",
                               batch_size=16, lr=1e-3, warmup_steps=100, ema_rate=0.999)
#: the latent U-Net (8x8x8 latents of 32x32 images) and its guidance scale: the recipe of the shipped
#: tests/data/shapes32-latent (89% of its samples judged the requested class after 7500 steps, 480 s
#: on 2 idle cores). With the shipped autoencoder on one thread, the default 9-minute demo trains it
#: 5529 steps (11.5 steps/s) and 84% of its samples are judged the requested class; a 64-channel
#: U-Net with attention at 4x4 ran 5.7 steps/s and reached 47% in the same minutes.
LATENT_DEMO_UNET = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
                        num_groups=8, dropout=0.0)
LATENT_DEMO_GUIDANCE = 5.0
#: share of the training budget that goes to the autoencoder when none is given
AUTOENCODER_SHARE = 0.4


def _train_demo_autoencoder(out_dir: Path, minutes: float, seed: int, dataset_size: int) -> Path:
    from fastdiff.train.autoencoder import AutoencoderConfig, train_autoencoder

    folder = out_dir / "autoencoder"
    config = AutoencoderConfig(data="shapes", out=str(folder), image_size=32, seed=seed, dataset_size=dataset_size,
                               steps=10 ** 7, save_every=10 ** 7, max_minutes=minutes, overwrite=True,
                               **LATENT_DEMO_AUTOENCODER)
    print(f"fastdiff demo --latent: training the autoencoder (f = 4) for {minutes:.1f} min into {folder}", flush=True)
    result = train_autoencoder(config)
    print(f"fastdiff demo --latent: autoencoder: {result.step} steps, held-out PSNR {result.psnr_db:.2f} dB, "
          f"scaling factor {result.scaling_factor:.4g}", flush=True)
    return folder


def run_latent_demo(out: str = "fastdiff-demo-latent", minutes: float = 9.0, autoencoder: Optional[str] = None,
                    batch_size: int = 32, n: int = 100, seed: int = 0, lr: float = 2e-3, dataset_size: int = 10000,
                    threads: Optional[int] = None) -> dict:
    """Latent diffusion end to end within `minutes` of wall clock: train an autoencoder (f = 4) on
    the 32x32 shapes for AUTOENCODER_SHARE of the budget unless `autoencoder` (a folder, e.g.
    tests/data/shapes32-ae) is given, train a class-conditional U-Net on its 8x8 latents for the
    rest (`fastdiff train --autoencoder`), and draw an n-image DDIM-50 grid, one row per class,
    decoded to pixels (samples.png, speed.json, README.md in `out`)."""
    from fastdiff.interop import load_model

    t_begin = time.time()
    torch.set_num_threads(threads if threads is not None else free_threads(announce="fastdiff demo --latent"))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    margin = 45.0 + 6e-4 * dataset_size * 2  # sampling and decoding the grid, generating the data twice
    budget = 60.0 * minutes - margin
    if autoencoder is None:
        autoencoder = str(_train_demo_autoencoder(out_dir, AUTOENCODER_SHARE * budget / 60.0, seed, dataset_size))
    else:
        load_model(autoencoder)  # a clear error now for a folder that is not an autoencoder
    train_seconds = max(5.0, 60.0 * minutes - margin - (time.time() - t_begin))
    config = TrainConfig(data="shapes", out=str(out_dir / "latent"), steps=10 ** 7, preset="demo", batch_size=batch_size,
                         seed=seed, lr=lr, warmup_steps=100, ema_rate=0.999, class_cond=True, p_uncond=0.1,
                         image_size=32, prediction="v", schedule="cosine", dataset_size=dataset_size, save_every=500,
                         sample_at_end=False, model=dict(LATENT_DEMO_UNET), log_every=10, overwrite=True,
                         guidance_scale=LATENT_DEMO_GUIDANCE,
                         autoencoder=autoencoder, max_minutes=train_seconds / 60.0)
    print(f"fastdiff demo --latent: training a class-conditional U-Net on the autoencoder's latents for "
          f"{train_seconds / 60:.1f} min into {config.out}", flush=True)
    result = train(config)
    model, _ = load_checkpoint(config.out, ema=True)
    _, _, sample_seconds = _class_grid(model, n, seed, out_dir / "samples.png", scale=3)
    speed = {"autoencoder": autoencoder, "latent_shape": list(model.sample_shape), "train_steps": result.step,
             "train_seconds": round(result.seconds, 1), "train_steps_per_s": round(result.steps_per_s, 3),
             "sample_images": n, "sample_seconds": round(sample_seconds, 1),
             "sample_images_per_s": round(n / sample_seconds, 3), "total_seconds": round(time.time() - t_begin, 1),
             "threads": torch.get_num_threads(), "torch": torch.__version__}
    (out_dir / "speed.json").write_text(json.dumps(speed, indent=1) + "\n")
    (out_dir / "README.md").write_text(
        f"# fastdiff demo --latent\n\nLatent diffusion (Rombach et al. 2022) on the 32x32 shapes: a class-conditional "
        f"U-Net trained for {result.step} steps ({result.seconds / 60:.1f} min) on the {model.sample_shape} latents of "
        f"the autoencoder `{autoencoder}` (f = 4), sampled with DDIM-{DDIM_STEPS} at guidance "
        f"w = {model.default_guidance_scale:g} and decoded. Row k is class k ({', '.join(SHAPE_CLASSES)}).\n\n"
        f"![samples](samples.png)\n\n" + "".join(f"- {k}: {v}\n" for k, v in speed.items()))
    print(f"fastdiff demo --latent: done in {(time.time() - t_begin) / 60:.1f} min: {out_dir / 'samples.png'}",
          flush=True)
    return speed
