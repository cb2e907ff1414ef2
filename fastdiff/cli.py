"""The `fastdiff` command line: train, sample, eval bpd, demo.

    fastdiff train --data shapes --out runs/shapes --steps 2000
    fastdiff sample runs/shapes --n 64 --steps 50 --eta 0 --out samples.png
    fastdiff eval bpd runs/shapes --data shapes --n 256 --steps 100
    fastdiff demo
    fastdiff reproduce --quick --out reproduce-quick

Exit codes: 0 success, 1 a run-time error (missing file, unreadable data, training
stopped on non-finite losses), 2 a usage error.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from fastdiff.data import DatasetError


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}")
    return v


def _positive_float(s: str) -> float:
    v = _nonneg_float(s)
    if v == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    return v


def _step_list(s: str) -> Tuple[int, ...]:
    try:
        steps = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers (e.g. 15000,18000), got {s!r}") from None
    if any(v < 1 for v in steps) or list(steps) != sorted(set(steps)):
        raise argparse.ArgumentTypeError(f"expected increasing positive step numbers, got {s!r}")
    return steps


# --------------------------------------------------------------------------- train
def _add_train_args(p: argparse.ArgumentParser) -> None:
    from fastdiff.diffusion import LOSSES, PREDICTIONS, T_SAMPLERS, VARIANCES
    from fastdiff.models.unet import PRESETS

    p.add_argument("--data", required=True, help="'shapes' (embedded), 'digits' (scikit-learn), a folder of "
                   "images, a CIFAR-10 binary folder/.bin file, or a .npz file (keys x/images, y/labels)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, samples, loss curve")
    p.add_argument("--steps", type=_positive_int, required=True, help="total training steps")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="U-Net preset (default: tiny)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="per-process batch size (default: 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--lr", type=_positive_float, default=2e-4, help="peak learning rate (default: 2e-4)")
    p.add_argument("--warmup", type=int, default=500, help="linear LR warm-up steps (default: 500)")
    p.add_argument("--lr-milestones", type=_step_list, default=(), metavar="STEPS",
                   help="comma-separated steps at which the LR is multiplied by --lr-gamma (default: none)")
    p.add_argument("--lr-gamma", type=_positive_float, default=0.1, help="LR factor at each milestone (default: 0.1)")
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.0)
    p.add_argument("--grad-clip", type=_nonneg_float, default=1.0, help="max gradient norm, 0 disables")
    p.add_argument("--ema-rate", type=_nonneg_float, default=0.9999)
    p.add_argument("--loss", choices=LOSSES, default="simple")
    p.add_argument("--t-sampler", choices=T_SAMPLERS, default="uniform")
    p.add_argument("--schedule", choices=("linear", "cosine"), default="linear")
    p.add_argument("--T", type=_positive_int, default=1000, help="diffusion steps (default: 1000)")
    p.add_argument("--prediction", choices=PREDICTIONS, default="eps")
    p.add_argument("--variance", choices=VARIANCES, default=None,
                   help="default: fixed_small for --loss simple, learned_range otherwise")
    p.add_argument("--dropout", type=_nonneg_float, default=None, help="default: the preset's")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--class-cond", action="store_true", help="condition on the dataset's labels")
    p.add_argument("--p-uncond", type=_nonneg_float, default=0.1, help="label dropout (classifier-free guidance)")
    p.add_argument("--guidance-scale", type=_nonneg_float, default=None,
                   help="default classifier-free guidance w recorded with the model for sampling (default: 3 "
                   "with --class-cond and --p-uncond > 0, else 0)")
    p.add_argument("--image-size", type=_positive_int, default=32)
    p.add_argument("--dataset-size", type=_positive_int, default=None, help="size of the generated 'shapes' set")
    p.add_argument("--save-every", type=_positive_int, default=500)
    p.add_argument("--sample-every", type=int, default=0, help="sample grid every N steps (0: at the end)")
    p.add_argument("--sample-n", type=_positive_int, default=16)
    p.add_argument("--sample-steps", type=_positive_int, default=50, help="DDIM steps of the sample grids")
    p.add_argument("--max-nonfinite", type=int, default=20, help="stop after more non-finite losses than this")
    p.add_argument("--max-minutes", type=_positive_float, default=None, help="wall-clock budget")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config_from_args(a: argparse.Namespace):
    from fastdiff.train import TrainConfig

    return TrainConfig(data=a.data, out=a.out, steps=a.steps, preset=a.preset, batch_size=a.batch_size, seed=a.seed,
                       resume=a.resume, lr=a.lr, warmup_steps=a.warmup, lr_milestones=a.lr_milestones,
                       lr_gamma=a.lr_gamma, weight_decay=a.weight_decay,
                       grad_clip=a.grad_clip, ema_rate=a.ema_rate, loss=a.loss, t_sampler=a.t_sampler,
                       schedule=a.schedule, T=a.T, prediction=a.prediction, variance=a.variance,
                       dropout=a.dropout, bf16=a.bf16, channels_last=a.channels_last, class_cond=a.class_cond,
                       p_uncond=a.p_uncond, guidance_scale=a.guidance_scale, image_size=a.image_size, dataset_size=a.dataset_size,
                       save_every=a.save_every, sample_every=a.sample_every, sample_n=a.sample_n,
                       sample_steps=a.sample_steps, max_nonfinite=a.max_nonfinite, max_minutes=a.max_minutes,
                       device=a.device, progress=not a.no_progress)


def cmd_train(a: argparse.Namespace) -> int:
    from fastdiff.train import train

    config = _config_from_args(a)
    try:
        config.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    result = train(config)
    if result.status == "nonfinite":
        print(f"fastdiff train: {result.message}", file=sys.stderr)
        return 1
    if result.status == "time":
        print(f"fastdiff train: {result.message}", file=sys.stderr)
    print(f"trained to step {result.step} in {result.seconds:.1f}s ({result.steps_per_s:.2f} steps/s, "
          f"{result.samples_per_s:.1f} samples/s); checkpoint in {result.out}")
    return 0


# --------------------------------------------------------------------------- sample
def cmd_sample(a: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import fastdiff
    from fastdiff.data import to_uint8
    from fastdiff.image_utils import save_image_grid
    from fastdiff.train import load_checkpoint, load_model

    source = Path(a.dir)
    if source.is_dir():
        model, record = load_checkpoint(source, ema=not a.no_ema)
        origin = f"step {record['step']}, {'model' if a.no_ema else 'EMA'} weights"
    else:
        if a.no_ema:
            raise UserError(f"--no-ema needs a run folder; {a.dir} is an exported model file")
        model, info = load_model(source)
        origin = f"step {info['step']}, {info['weights']} weights of {source.name}"
    if a.steps > model.diffusion.T:
        raise UserError(f"--steps {a.steps} exceeds the model's T={model.diffusion.T}")
    n, nrow = a.n, int(math.ceil(math.sqrt(a.n)))
    num_classes = model.num_classes
    if a.classifier is not None:
        from fastdiff.classifier_training import load_classifier
        classifier = load_classifier(a.classifier)
        num_classes = num_classes or classifier.num_classes
    else:
        classifier = None
    labels = None
    if a.per_class is not None:
        if not num_classes:
            raise UserError("--per-class needs a class-conditional model or a --classifier")
        if a.label is not None:
            raise UserError("--per-class draws every class; it cannot be combined with --class")
        n, nrow = a.per_class * num_classes, a.per_class
        labels = torch.arange(n) // a.per_class  # row k: class k
    elif a.label is not None:
        if not num_classes:
            raise UserError("--class given but the model is not class-conditional (and no --classifier)")
        if not 0 <= a.label < num_classes:
            raise UserError(f"--class must be in [0, {num_classes - 1}], got {a.label}")
        labels = torch.full((n,), a.label)
    elif num_classes:
        labels = torch.arange(n) % num_classes
    if a.guidance_scale and not model.num_classes:
        raise UserError("--guidance-scale needs a class-conditional model (trained with labels)")
    w = model.default_guidance_scale if a.guidance_scale is None else a.guidance_scale  # 0 if unconditional
    t0 = time.time()
    x = fastdiff.sample(model, n=n, steps=a.steps, eta=a.eta, seed=a.seed, sampler=a.sampler,
                        progress=not a.no_progress, y=labels, guidance_scale=w,
                        classifier=classifier, classifier_scale=a.classifier_scale)
    seconds = time.time() - t0
    out = Path(a.out)
    png, npz = (out, out.with_suffix(".npz")) if out.suffix.lower() != ".npz" else (out.with_suffix(".png"), out)
    if png.suffix.lower() != ".png":
        png = png.with_suffix(png.suffix + ".png")
    save_image_grid(x, png, nrow=nrow, scale=a.scale)
    arrays = {"images": to_uint8(x).permute(0, 2, 3, 1).numpy()}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    np.savez(npz, **arrays)
    guided = f", guidance scale {w:g}" if model.num_classes else ""
    print(f"{n} samples ({a.sampler}, {a.steps} steps, eta={a.eta}{guided}) in {seconds:.1f}s "
          f"({n / seconds:.2f} samples/s): {png} and {npz} ({origin})")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from fastdiff.train import export_model

    path = export_model(a.dir, a.out, ema=not a.no_ema, dtype=a.dtype)
    print(f"exported {'model' if a.no_ema else 'EMA'} weights of {a.dir} ({a.dtype}) to {path} "
          f"({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_train_classifier(a: argparse.Namespace) -> int:
    from fastdiff.classifier_training import ClassifierConfig, train_classifier

    cfg = ClassifierConfig(data=a.data, out=a.out, steps=a.steps, preset=a.preset, batch_size=a.batch_size,
                           lr=a.lr, seed=a.seed, schedule=a.schedule, T=a.T, image_size=a.image_size,
                           progress=not a.no_progress)
    out = train_classifier(cfg)
    print(f"classifier trained for {a.steps} steps: {out}")
    return 0


# --------------------------------------------------------------------------- eval
def cmd_eval_bpd(a: argparse.Namespace) -> int:
    import torch

    from fastdiff.data import load_dataset
    from fastdiff.sampling import space_timesteps
    from fastdiff.train import load_checkpoint

    model, record = load_checkpoint(a.dir, ema=not a.no_ema)
    d = model.diffusion
    steps = a.steps or d.T
    if steps > d.T:
        raise UserError(f"--steps {steps} exceeds the model's T={d.T}")
    if steps < d.T:
        d = d.respace(space_timesteps(d.T, steps, "uniform"))
    ds = load_dataset(a.data, image_size=model.sample_shape[-1], train=a.split == "train", seed=0)
    if ds.shape[0] != model.sample_shape[0]:
        raise UserError(f"{a.data}: {ds.shape[0]}-channel images, but the model takes {model.sample_shape[0]}")
    n = min(a.n, len(ds))
    gen = torch.Generator().manual_seed(a.seed)
    totals = []
    t0 = time.time()
    for start in range(0, n, a.batch_size):
        x, _ = ds.batch(range(start, min(n, start + a.batch_size)))
        res = d.nll_bpd(model, x, generator=gen, progress=not a.no_progress)
        totals.append(res["total_bpd"].double())
    bpd = torch.cat(totals)
    mean = bpd.mean().item()
    half = 1.96 * bpd.std().item() / math.sqrt(n) if n > 1 else float("nan")
    what = f"T={d.T}" + (f" (respaced from {model.diffusion.T})" if d.T != model.diffusion.T else "")
    print(f"bits/dim: {mean:.4f} ± {half:.4f} (95% CI; n={n}, {what}, {a.split} split, step {record['step']}, "
          f"{time.time() - t0:.1f}s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"bpd": mean, "ci95": half, "n": n, "T": d.T, "split": a.split,
                                            "step": record["step"]}, indent=1))
    return 0


# --------------------------------------------------------------------------- demo

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
    import platform

    import numpy as np
    import torch

    import fastdiff
    from fastdiff.data import SHAPE_CLASSES, to_uint8
    from fastdiff.image_utils import save_image_grid
    from fastdiff.models.unet import UNet
    from fastdiff.train import TrainConfig, build_diffusion, load_checkpoint, train

    t_begin = time.time()
    if threads is None:
        threads = _free_threads()
    torch.set_num_threads(threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ddim_steps = 50
    config = TrainConfig(data="shapes", out=str(out_dir), steps=10 ** 7, preset=preset or "demo", batch_size=batch_size,
                         seed=seed, lr=lr, warmup_steps=100, ema_rate=0.999, class_cond=True, p_uncond=0.1,
                         image_size=image_size, prediction="v", schedule="cosine",
                         dataset_size=dataset_size, save_every=250, sample_at_end=False, model={},
                         log_every=10, bf16=not fp32, channels_last=not fp32)
    # Budget: measure one sampling forward pass, keep 50 of them (x1.5) plus a margin for sampling.
    probe = UNet.preset(config.preset, num_classes=10, diffusion=build_diffusion(config), image_size=image_size,
                        **config.model).eval()
    with torch.no_grad():
        rows = 2 * n if config.resolved_guidance_scale > 0 else n  # guidance: both branches in one batch
        xb, tb, yb = torch.randn(rows, 3, image_size, image_size), torch.full((rows,), 500), torch.arange(rows) % 11
        probe(xb, tb, y=yb)  # first call: allocator and kernel set-up
        best = math.inf
        for _ in range(2):
            t0 = time.time()
            probe(xb, tb, y=yb)
            best = min(best, time.time() - t0)
        sample_estimate = 1.5 * ddim_steps * best + 5.0
    params = probe.num_parameters()
    del probe
    # the rest of the margin: generating the data (~0.6 ms an image) and the final save
    train_seconds = 60.0 * minutes - (time.time() - t_begin) - sample_estimate - 5.0 - 6e-4 * dataset_size
    if train_seconds < 5:
        print(f"fastdiff demo: warning: --minutes {minutes:g} is too short (sampling alone needs about "
              f"{sample_estimate:.0f}s); training for 5 s anyway", file=sys.stderr)
        train_seconds = 5.0
    config.max_minutes = train_seconds / 60.0
    print(f"fastdiff demo: training a {params / 1e6:.2f}M-parameter U-Net on the embedded shapes for "
          f"{train_seconds / 60:.1f} min (of a {minutes:g} min budget), then DDIM-{ddim_steps} sampling "
          f"{n} images (about {sample_estimate:.0f}s) into {out_dir}", flush=True)
    result = train(config)
    print(f"fastdiff demo: {result.step} steps at {result.steps_per_s:.2f} steps/s "
          f"({result.samples_per_s:.1f} images/s); sampling...", flush=True)
    model, _ = load_checkpoint(out_dir, ema=True)
    labels = (torch.arange(n) // 10) % 10  # 10 columns: row k shows class k
    t0 = time.time()
    w = model.default_guidance_scale
    x = fastdiff.sample(model, n=n, steps=ddim_steps, eta=0.0, seed=seed, y=labels, guidance_scale=w, progress=True)
    sample_seconds = time.time() - t0
    save_image_grid(x, out_dir / "samples.png", nrow=min(10, n), scale=max(2, 96 // image_size))
    np.savez(out_dir / "samples.npz", images=to_uint8(x).permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
    total = time.time() - t_begin
    speed = {
        "train_steps": result.step, "train_seconds": round(result.seconds, 1),
        "train_steps_per_s": round(result.steps_per_s, 3), "train_images_per_s": round(result.samples_per_s, 2),
        "batch_size": batch_size, "image_size": image_size, "precision": "fp32" if fp32 else "bf16 autocast + channels_last",
        "sampler": f"DDIM-{ddim_steps}, eta=0 (fp32)", "guidance_scale": w, "sample_images": n,
        "sample_seconds": round(sample_seconds, 1), "sample_images_per_s": round(n / sample_seconds, 3),
        "total_seconds": round(total, 1), "parameters": params, "final_loss": round(float(np.mean(
            [l for _, l in result.losses[-50:]])), 4) if result.losses else None,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or
        platform.machine(), "backend": fastdiff.ops.current_backend(),
    }
    (out_dir / "speed.json").write_text(json.dumps(speed, indent=1) + "\n")
    rows = "\n".join(f"| {i} | {name} |" for i, name in enumerate(SHAPE_CLASSES))
    (out_dir / "README.md").write_text(
        f"# fastdiff demo\n\nA {params / 1e6:.2f}M-parameter class-conditional U-Net "
        f"({image_size}x{image_size}, v-prediction, cosine schedule) trained for "
        f"{result.step} steps ({result.seconds / 60:.1f} min, batch {batch_size}) on the embedded `shapes` data, "
        f"sampled with DDIM-{ddim_steps} (eta 0, EMA weights, classifier-free guidance w = {w:g}). "
        f"Row k of the grid is class k.\n\n"
        f"![samples](samples.png)\n\n![loss](loss.png)\n\n| row | class |\n|---|---|\n{rows}\n\n"
        f"## Speed\n\n| measure | value |\n|---|---|\n"
        + "".join(f"| {k} | {v} |\n" for k, v in speed.items()))
    print(f"fastdiff demo: done in {total / 60:.1f} min: {out_dir / 'samples.png'} (row k = {', '.join(SHAPE_CLASSES)}), "
          f"{out_dir / 'loss.png'}, {out_dir / 'speed.json'}, {out_dir / 'README.md'}")
    return speed


def _free_threads() -> int:
    """torch's default thread count, less the cores other processes keep busy (1-minute load
    average): OpenMP threads that wait on a taken core cost far more than they bring."""
    import os

    import torch

    default = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        return default
    cores = os.cpu_count() or default
    free = max(1, min(default, int(cores - busy + 0.5)))
    if free < default:
        print(f"fastdiff demo: the machine is busy (load {busy:.1f} on {cores} cores): using {free} thread(s)",
              flush=True)
    return free


def cmd_demo(a: argparse.Namespace) -> int:
    run_demo(out=a.out, minutes=a.minutes, preset=a.preset, batch_size=a.batch_size, n=a.n, seed=a.seed,
             lr=a.lr, dataset_size=a.dataset_size, fp32=a.fp32, image_size=a.image_size, threads=a.threads)
    return 0


# --------------------------------------------------------------------------- reproduce
def _experiment_list(s: str) -> List[int]:
    from fastdiff.reproduce import EXPERIMENTS

    parts = [p.strip() for p in s.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = None
    if not parts or values is None or any(v not in EXPERIMENTS for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated experiment numbers from 1 to {len(EXPERIMENTS)} "
                                         f"(e.g. 1,3), got {s!r}")
    return sorted(set(values))


def cmd_reproduce(a: argparse.Namespace) -> int:
    from fastdiff.reproduce import MATPLOTLIB_HINT, reproduce

    try:
        import matplotlib  # noqa: F401
        import scipy  # noqa: F401
    except ImportError:
        raise UserError(MATPLOTLIB_HINT) from None
    threads = a.threads if a.threads is not None else _free_threads()
    argv = ["fastdiff reproduce"] + (["--quick"] if a.quick else []) + ["--out", a.out, "--seed", str(a.seed),
                                                                       "--threads", str(threads)]
    if a.only:
        argv += ["--only", ",".join(map(str, a.only))]
    path = reproduce(a.out, quick=a.quick, seed=a.seed, only=a.only, threads=threads,
                     progress=not a.no_progress, command=" ".join(argv))
    print(f"fastdiff reproduce: report written to {path}")
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdiff", description="Fast, correct diffusion models: train a DDPM "
                                     "U-Net, sample it (DDIM/DDPM), measure its bits/dim.")
    from fastdiff import __version__
    parser.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a U-Net", description="Train a U-Net; checkpoints, sample grids and a "
                       "loss curve go to --out. Under torchrun, trains with DistributedDataParallel.")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples from a trained run or an exported model",
                       description="Sample a trained run or a `fastdiff export` file; writes a PNG grid and an "
                       ".npz (uint8 NHWC 'images', and 'labels' for class-conditional sampling).")
    p.add_argument("dir", help="run folder (holding checkpoint.json) or exported model file (.safetensors)")
    p.add_argument("--n", type=_positive_int, default=16, help="number of samples (default: 16)")
    p.add_argument("--steps", type=_positive_int, default=50, help="sampler steps (default: 50)")
    p.add_argument("--eta", type=_nonneg_float, default=0.0, help="DDIM eta (default: 0)")
    p.add_argument("--out", required=True, help="output .png (an .npz is written next to it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--class", "--label", dest="label", type=int, default=None,
                   help="class of every sample (default: cycle through the classes)")
    p.add_argument("--scale", type=_positive_int, default=2, help="pixel magnification of the PNG grid (default: 2)")
    p.add_argument("--per-class", type=_positive_int, default=None, metavar="K",
                   help="K samples of every class, one row per class (instead of --n)")
    p.add_argument("--guidance-scale", type=_nonneg_float, default=None,
                   help="classifier-free guidance w: (1+w) eps(x, y) - w eps(x) (default: the model's, "
                   "recorded at training)")
    p.add_argument("--classifier", default=None, help="folder of a `fastdiff train-classifier` run: classifier guidance")
    p.add_argument("--classifier-scale", type=_nonneg_float, default=1.0, help="classifier guidance scale (default: 1)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="write a run's weights as one small self-describing file",
                       description="Write the EMA weights of a training run, with the U-Net and diffusion "
                       "configuration and default guidance scale in the file's metadata, as one .safetensors "
                       "file (no optimizer state) that `fastdiff sample` and fastdiff.train.load_model read.")
    p.add_argument("dir", help="run folder (holding checkpoint.json)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="storage precision (loaded back as fp32; default: fp32)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train-classifier", help="train a noisy classifier for classifier guidance",
                       description="Train a time-conditioned classifier of noised images x_t (Dhariwal & Nichol), "
                       "for `fastdiff sample --classifier DIR`. Use the diffusion model's schedule and T.")
    p.add_argument("--data", default="shapes", help="labelled dataset, as for train (default: shapes)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=_positive_int, default=2000)
    p.add_argument("--preset", default="small", choices=("tiny", "small"))
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=_positive_float, default=3e-4)
    p.add_argument("--schedule", choices=("linear", "cosine"), default="linear")
    p.add_argument("--T", type=_positive_int, default=1000, help="diffusion steps (default: 1000)")
    p.add_argument("--image-size", type=_positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("eval", help="evaluate a trained run", description="Evaluate a trained run.")
    esub = p.add_subparsers(dest="metric", metavar="METRIC")
    esub.required = True
    e = esub.add_parser("bpd", help="bits/dim (variational bound) with a 95%% confidence interval",
                        description="Bits/dim by the full variational bound: T model evaluations per batch. "
                        "--steps S evaluates the bound of the process respaced to S steps (an upper bound "
                        "that is looser than the full one, but S/T of the cost).")
    e.add_argument("dir", help="run folder (holding checkpoint.json)")
    e.add_argument("--data", required=True, help="dataset, as for train")
    e.add_argument("--n", type=_positive_int, default=256, help="number of images (default: 256)")
    e.add_argument("--steps", type=_positive_int, default=None, help="respaced process length (default: T)")
    e.add_argument("--batch-size", type=_positive_int, default=64)
    e.add_argument("--split", choices=("test", "train"), default="test",
                   help="held-out split where the dataset has one (default: test)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-ema", action="store_true")
    e.add_argument("--json", default=None, help="also write the result to this JSON file")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval_bpd)
    from fastdiff.evaluation_cli import add_fid_parser, add_train_features_parser
    add_fid_parser(esub)

    add_train_features_parser(sub)

    p = sub.add_parser("demo", help="train a small model on the embedded shapes and sample it (minutes, CPU)",
                       description="Train a small class-conditional U-Net on the embedded 'shapes' data within a "
                       "wall-clock budget, then draw a DDIM-50 grid (one row per class). Writes samples.png, "
                       "loss.png, speed.json and README.md to --out.")
    p.add_argument("--out", default="fastdiff-demo", help="output folder (default: fastdiff-demo)")
    p.add_argument("--minutes", type=_positive_float, default=9.0,
                   help="total wall-clock budget, sampling included (default: 9)")
    p.add_argument("--preset", default=None, help="U-Net preset (default: demo)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--n", type=_positive_int, default=100, help="samples in the grid (default: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate (default: 2e-3)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads (default: the cores not kept busy by other processes)")
    p.add_argument("--image-size", type=_positive_int, default=16,
                   help="resolution of the rendered shapes (default: 16; 32 is 4x the cost per step)")
    p.add_argument("--fp32", action="store_true", help="train in fp32 (default: bf16 autocast + channels_last)")
    p.add_argument("--dataset-size", type=_positive_int, default=10000,
                   help="size of the generated shapes set (default: 10000)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("reproduce", help="reproduce the thesis's claims at small scale: REPORT.md + plots",
                       description="Run five small experiments (noise schedules; L_simple/L_hybrid/L_vlb; the DDIM "
                       "eta x steps table; fixed vs learned variance under respacing; oracle convergence) on the "
                       "embedded shapes and the oracle kit, and write REPORT.md with PNG plots to --out. Trained "
                       "models and results are cached in --out: a rerun resumes. The full run takes about an hour on "
                       "2 CPU cores; --quick a few minutes. Needs matplotlib (pip install \"fastdiff[report]\").")
    p.add_argument("--quick", action="store_true", help="reduced settings (minutes; checks the pipeline, not the "
                   "papers' trends)")
    p.add_argument("--out", default="fastdiff-reproduce", help="output folder (default: fastdiff-reproduce)")
    p.add_argument("--seed", type=int, default=0, help="seed of training, sampling and evaluation (default: 0)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads (default: the cores not kept busy by other processes)")
    p.add_argument("--only", type=_experiment_list, default=None, metavar="LIST",
                   help="run only these experiments, e.g. 1,3 (default: all five)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"fastdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (DatasetError, FileNotFoundError, ValueError) as e:
        print(f"fastdiff {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
