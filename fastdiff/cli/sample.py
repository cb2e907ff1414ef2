"""`fastdiff sample` and `fastdiff export`."""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from fastdiff.errors import InputError, UserError
from fastdiff.options import nonneg_float, positive_int


def load_for_sampling(source: str, no_ema: bool = False):
    """(model, description) from a run folder (EMA weights unless no_ema) or an exported file."""
    from fastdiff.interop import load_model
    from fastdiff.train import load_checkpoint

    from fastdiff.interop import is_autoencoder_folder, is_diffusers_folder

    path = Path(source)
    if is_autoencoder_folder(path):
        raise UserError(f"{source} is an autoencoder (a diffusers AutoencoderKL folder), not a diffusion model: it has "
                        f"nothing to sample. Train a latent diffusion model on it with `fastdiff train --autoencoder "
                        f"{source} --data ... --out RUN`, then `fastdiff sample RUN`")
    if is_diffusers_folder(path):
        if no_ema:
            raise UserError(f"--no-ema needs a run folder; {source} is a diffusers folder")
        model, info = load_model(path)
        return model, f"diffusers folder {path.name}"
    if path.is_dir():
        model, record = load_checkpoint(path, ema=not no_ema)
        return model, f"step {record['step']}, {'model' if no_ema else 'EMA'} weights"
    if no_ema:
        raise UserError(f"--no-ema needs a run folder; {source} is an exported model file")
    model, info = load_model(path)
    return model, f"step {info['step']}, {info['weights']} weights of {path.name}"


def class_labels(model, n: int, label=None, per_class=None, classifier=None):
    """(labels or None, n, grid row length) for `fastdiff sample`'s class options: cycle through
    the classes by default, one class with --class, K of each class (row k = class k) with
    --per-class K."""
    import torch

    num_classes = model.num_classes or (classifier.num_classes if classifier is not None else None)
    nrow = int(math.ceil(math.sqrt(n)))
    if per_class is not None:
        if not num_classes:
            raise UserError("--per-class needs a class-conditional model or a --classifier")
        if label is not None:
            raise UserError("--per-class draws every class; it cannot be combined with --class")
        n = per_class * num_classes
        return torch.arange(n) // per_class, n, per_class
    if label is not None:
        if not num_classes:
            raise UserError("--class given but the model is not class-conditional (and no --classifier)")
        if not 0 <= label < num_classes:
            raise UserError(f"--class must be in [0, {num_classes - 1}], got {label}")
        return torch.full((n,), label), n, nrow
    if num_classes:
        return torch.arange(n) % num_classes, n, nrow
    return None, n, nrow


# fastdiff.sampling.SAMPLERS / SPACINGS (fixed names; tests/test_solvers.py checks they agree),
# spelled out so that building the parser does not import torch
SAMPLER_NAMES = ("ddim", "ddpm", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "dpm_solver_2", "dpm_solver_3", "sde", "pc",
                 "ode", "unipc")
SPACING_NAMES = ("uniform", "leading", "trailing", "quadratic", "logsnr", "karras")


def add_sampler_options(p: argparse.ArgumentParser, steps_default: int = 50) -> None:
    """The options that choose how samples are drawn (shared by `sample` and `eval fid`)."""
    p.add_argument("--steps", type=positive_int, default=steps_default,
                   help=f"sampler steps (default: {steps_default})")
    p.add_argument("--eta", type=nonneg_float, default=0.0, help="DDIM eta (default: 0)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddim",
                   help="ddim, ddpm (ancestral) or a continuous-time solver (docs/score-based.md); default: ddim")
    p.add_argument("--spacing", choices=SPACING_NAMES, default=None,
                   help="which timesteps are visited (default: the sampler's own: ddim/ddpm uniform, "
                   "DPM-Solver family logsnr, euler/heun karras)")
    p.add_argument("--s-churn", type=nonneg_float, default=None, help="euler/heun: Karras et al.'s S_churn")
    p.add_argument("--rtol", type=float, default=None, help="ode: relative tolerance (default: 1e-5)")
    p.add_argument("--atol", type=float, default=None, help="ode: absolute tolerance (default: 1e-5)")
    p.add_argument("--seed", type=int, default=0, help="noise seed: sample i's noise depends on (seed, i) only")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per forward pass (default: 64; the images do not depend on it)")
    p.add_argument("--guidance-scale", type=nonneg_float, default=None,
                   help="classifier-free guidance w: (1+w) eps(x, y) - w eps(x) (default: the model's, "
                   "recorded at training)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--no-progress", action="store_true")


def guidance_scale_of(model, requested):
    if requested and not model.num_classes:
        raise UserError("--guidance-scale needs a class-conditional model (trained with labels)")
    return model.default_guidance_scale if requested is None else requested  # 0 if unconditional


def draw(model, n: int, labels, a: argparse.Namespace, classifier=None, sample_offset: int = 0):
    """n samples as `fastdiff sample` draws them (see sample_in_batches: independent of --batch-size);
    sample_offset: the index of the first (samples offset.. of a larger request, for shards)."""
    import torch

    from fastdiff.sampling import sample_in_batches

    if a.steps > model.diffusion.T:
        raise UserError(f"--steps {a.steps} exceeds the model's T={model.diffusion.T}")
    w = guidance_scale_of(model, a.guidance_scale)
    extra = {k: getattr(a, k, None) for k in ("s_churn", "rtol", "atol")}
    extra = {k: v for k, v in extra.items() if v is not None}
    if getattr(a, "spacing", None) is not None:
        extra["spacing"] = a.spacing
    if classifier is not None:
        extra.update(classifier=classifier, classifier_scale=a.classifier_scale)
    try:
        chunks = sample_in_batches(model, n, a.batch_size, y=labels, steps=a.steps, eta=a.eta, seed=a.seed,
                                   sampler=a.sampler, progress=not a.no_progress, guidance_scale=w,
                                   sample_offset=sample_offset, **extra)
        return torch.cat(list(chunks)), w
    except ValueError as e:  # a sampler option that does not fit the sampler: the user's to fix
        raise UserError(str(e)) from None


def output_paths(out: str):
    """(png, npz) that `fastdiff sample --out OUT` writes, checked before any work: files that
    can be written, neither a folder nor a file of a training run."""
    from fastdiff.io import check_output_file
    from fastdiff.train.checkpoint import refuse_run_file

    out = Path(out)
    png, npz = (out, out.with_suffix(".npz")) if out.suffix.lower() != ".npz" else (out.with_suffix(".png"), out)
    if png.suffix.lower() != ".png":
        png = png.with_suffix(png.suffix + ".png")
    for path in (png, npz):
        refuse_run_file(path)
        check_output_file(path)
    return png, npz


# Bounds on what one `fastdiff sample` may allocate: all samples are held in memory (fp32), and
# the PNG grid is one image.
MAX_SAMPLE_BYTES = 8 << 30
MAX_GRID_PIXELS = 1 << 28


def check_sample_sizes(model, n: int, nrow: int, scale: int) -> None:
    c, h, w = image_shape(model)
    if n * c * h * w * 4 > MAX_SAMPLE_BYTES:
        raise UserError(f"--n {n}: {n} samples of {c}x{h}x{w} take {n * c * h * w * 4 / 2**30:.1f} GiB "
                        f"(at most {MAX_SAMPLE_BYTES / 2**30:.0f} GiB per call); draw them in several calls "
                        f"with --seed / fewer samples")
    rows = -(-n // nrow)
    pixels = rows * (h + 2) * nrow * (w + 2) * scale * scale
    if pixels > MAX_GRID_PIXELS:
        raise UserError(f"--scale {scale}: the PNG grid of {n} samples would have {pixels:,} pixels (at most "
                        f"{MAX_GRID_PIXELS:,}); lower --scale or --n")


def image_shape(model):
    """(C, H, W) of the images a model gives: a latent model's decoded images, not its latents."""
    return tuple(getattr(model, "image_shape", None) or model.sample_shape)


def check_classifier(classifier, model) -> None:
    """A classifier guides the sampler where it works: on images, or on a latent model's latents."""
    shape = getattr(classifier, "sample_shape", None)
    if shape is not None and tuple(shape) != tuple(model.sample_shape):
        what = " (a latent model is guided by a classifier of its latents)" if hasattr(model, "decode_latents") else ""
        raise UserError(f"--classifier takes inputs of shape {tuple(shape)}, but the model samples "
                        f"{tuple(model.sample_shape)}{what}")


def refuse_nonfinite(x, what: str) -> None:
    """InputError (exit 1) when samples hold NaN or inf: the model is broken (diverged or a
    damaged file); writing them would give a black image and exit 0."""
    import torch

    bad = ~torch.isfinite(x).flatten(1).all(dim=1)
    if bool(bad.any()):
        raise InputError(f"{int(bad.sum())} of {x.shape[0]} samples hold NaN or inf values: the model ({what}) "
                         f"produces non-finite outputs (diverged or damaged weights); nothing was written")


def cmd_sample(a: argparse.Namespace) -> int:
    import numpy as np

    from fastdiff.data import to_uint8
    from fastdiff.cli.shards import cmd_sample_shards, is_folder_out, wants_shards
    from fastdiff.image_utils import save_image_grid

    from fastdiff.cli.fast import optimize_for, report_compile
    from fastdiff.io import check_output_dir

    if wants_shards(a):  # a folder --out, --shard-size, or torchrun
        if is_folder_out(a.out):
            check_output_dir(a.out)
        return cmd_sample_shards(a)
    png, npz = output_paths(a.out)
    model, origin = load_for_sampling(a.dir, a.no_ema)
    model = optimize_for(model, a)  # --fast
    if hasattr(model, "decode_latents"):
        origin += (f"; latent diffusion: sampled as {'x'.join(map(str, model.sample_shape))} latents, decoded by its "
                   f"autoencoder to {'x'.join(map(str, image_shape(model)))} images")
    classifier = None
    if a.classifier is not None:
        from fastdiff.train.classifier import load_classifier
        classifier = load_classifier(a.classifier)
        check_classifier(classifier, model)
    labels, n, nrow = class_labels(model, a.n, a.label, a.per_class, classifier)
    check_sample_sizes(model, n, nrow, a.scale)
    t0 = time.time()
    x, w = draw(model, n, labels, a, classifier)
    seconds = time.time() - t0
    report_compile(model)
    refuse_nonfinite(x, f"{a.dir}, {origin}")
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
    from fastdiff.interop import export_model, is_autoencoder_folder
    from fastdiff.io import check_output_file
    from fastdiff.train.checkpoint import refuse_run_file

    if is_autoencoder_folder(Path(a.dir)):
        raise UserError(f"{a.dir} is an autoencoder (a diffusers AutoencoderKL folder), not a training run: there is "
                        f"nothing to export (fastdiff.interop.export_autoencoder writes autoencoders)")
    if a.compiled:
        return cmd_export_compiled(a)
    if a.format == "diffusers":
        from fastdiff.interop import export_diffusers
        from fastdiff.io import check_output_dir

        refuse_run_file(a.out)
        check_output_dir(a.out)
        from fastdiff.interop.native import _EXPORT_DTYPES
        from fastdiff.train import load_checkpoint

        model, _ = load_checkpoint(a.dir, ema=not a.no_ema)
        if hasattr(model, "decode_latents"):
            raise UserError(f"{a.dir} is a latent diffusion model (trained with --autoencoder): a diffusers pixel "
                            "pipeline cannot hold it; export it with --format fastdiff (one file with its autoencoder)")
        path = export_diffusers(model, a.out, dtype=_EXPORT_DTYPES[a.dtype])
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"exported {'model' if a.no_ema else 'EMA'} weights of {a.dir} ({a.dtype}) as a diffusers pipeline "
              f"folder {path} ({size / 1e6:.1f} MB)")
        return 0
    refuse_run_file(a.out)
    check_output_file(a.out)
    path = export_model(a.dir, a.out, ema=not a.no_ema, dtype=a.dtype)
    print(f"exported {'model' if a.no_ema else 'EMA'} weights of {a.dir} ({a.dtype}) to {path} "
          f"({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_export_compiled(a: argparse.Namespace) -> int:
    """`fastdiff export RUN --compiled`: an AOTInductor package (fastdiff/interop/compiled.py)."""
    import dataclasses
    import json

    from fastdiff.interop.compiled import PACKAGE_SUFFIX, export_compiled
    from fastdiff.io import check_output_file
    from fastdiff.train import load_checkpoint
    from fastdiff.train.checkpoint import refuse_run_file
    from fastdiff.train.config import config_from_dict

    if a.format != "fastdiff":
        raise UserError(f"--compiled writes an AOTInductor package; it cannot be combined with --format {a.format}")
    if not a.out.endswith(PACKAGE_SUFFIX):
        raise UserError(f"--compiled: --out must end in {PACKAGE_SUFFIX} (AOTInductor's package), got {a.out!r}")
    refuse_run_file(a.out)
    check_output_file(a.out)
    if Path(a.dir).is_dir():
        model, record = load_checkpoint(a.dir, ema=not a.no_ema)
        step, weights, model_config = record["step"], "model" if a.no_ema else "ema", record["model_config"]
        config = config_from_dict(record["config"])
    else:  # a `fastdiff export` .safetensors file
        from fastdiff.interop import load_model
        if a.no_ema:
            raise UserError(f"--no-ema needs a run folder; {a.dir} is an exported model file")
        model, info = load_model(a.dir)
        if "config" not in info or not hasattr(model, "config"):
            raise UserError(f"{a.dir}: --compiled takes a fastdiff run folder or `fastdiff export` file")
        step, weights, model_config = info["step"], info["weights"], model.config
        config = config_from_dict(info["config"])
    if hasattr(model, "decode_latents"):
        raise UserError(f"{a.dir} is a latent diffusion model: --compiled packages pixel-space U-Nets only (the "
                        "autoencoder's decoder is not in the package); export it without --compiled")
    metadata = {"config": json.dumps(dataclasses.asdict(config)), "model_config": json.dumps(model_config),
                "step": step, "weights": weights, "default_guidance_scale": repr(config.resolved_guidance_scale)}
    print(f"compiling {a.dir} ahead of time (AOTInductor, {a.precision}, {a.ops} ops, batch {a.batch_size}); "
          "this takes minutes for a large U-Net", flush=True)
    path, seconds = export_compiled(model, a.out, metadata, a.batch_size, a.precision, a.ops)
    print(f"exported {weights} weights of {a.dir} as a compiled package {path} ({path.stat().st_size / 1e6:.1f} MB) "
          f"in {seconds:.1f}s; `fastdiff sample {path} ...` and fastdiff.load_model load it without compiling")
    return 0


def register(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run or an exported model",
                       description="Sample a trained run or a `fastdiff export` file; writes a PNG grid and an "
                       ".npz (uint8 NHWC 'images', and 'labels' for class-conditional sampling).")
    p.add_argument("dir", help="run folder (holding checkpoint.json), exported model file (.safetensors), or a "
                   "diffusers UNet2DModel or pipeline folder")
    p.add_argument("--n", type=positive_int, default=16, help="number of samples (default: 16)")
    p.add_argument("--out", required=True, help="output .png (an .npz is written next to it), or a folder (ending "
                   "in '/') of shards: .npz files and one PNG per sample (see fastdiff/cli/shards.py)")
    p.add_argument("--shard-size", type=positive_int, default=None, metavar="K",
                   help="samples per shard, a multiple of --batch-size (default: 16 batches); finished "
                   "shards are skipped when the command is rerun; torchrun ranks split the shards")
    from fastdiff.cli.fast import add_fast_option
    add_fast_option(p)
    add_sampler_options(p)
    p.add_argument("--class", "--label", dest="label", type=int, default=None,
                   help="class of every sample (default: cycle through the classes)")
    p.add_argument("--scale", type=positive_int, default=2, help="pixel magnification of the PNG grid (default: 2)")
    p.add_argument("--per-class", type=positive_int, default=None, metavar="K",
                   help="K samples of every class, one row per class (instead of --n)")
    p.add_argument("--classifier", default=None, help="folder of a `fastdiff train-classifier` run: classifier guidance")
    p.add_argument("--classifier-scale", type=nonneg_float, default=1.0, help="classifier guidance scale (default: 1)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="write a run's weights as one small self-describing file",
                       description="Write the EMA weights of a training run, with the U-Net and diffusion "
                       "configuration and default guidance scale in the file's metadata, as one .safetensors "
                       "file (no optimizer state) that `fastdiff sample` and fastdiff.load_model read; or, with --format diffusers, "
                       "as a diffusers pipeline folder.")
    p.add_argument("dir", help="run folder (holding checkpoint.json)")
    p.add_argument("--out", required=True, help="output .safetensors file (a new folder for --format diffusers)")
    p.add_argument("--format", choices=("fastdiff", "diffusers"), default="fastdiff",
                   help="fastdiff: one self-describing .safetensors file (default); diffusers: a pipeline folder "
                   "(model_index.json, unet/, scheduler/) that diffusers' DiffusionPipeline.from_pretrained loads")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="storage precision (loaded back as fp32; default: fp32)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    p.add_argument("--compiled", action="store_true",
                   help="write an ahead-of-time compiled package (--out NAME.pt2, AOTInductor: generated C++ and the "
                   "weights) that `fastdiff sample` and fastdiff.load_model run without compiling; tied to this "
                   "torch version and CPU")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="--compiled: the package's forward batch (default: 64; other batches are cut and padded)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="--compiled: fp32 (default) or bf16 autocast inside the package")
    p.add_argument("--ops", choices=("fused", "reference"), default="fused",
                   help="--compiled: fastdiff's fused ops as calls in the package (default), or their pure-torch "
                   "references compiled into it")
    p.set_defaults(func=cmd_export)
