"""`fastdiff eval bpd` and `fastdiff eval fid`.

    fastdiff eval bpd runs/shapes --data shapes --n 256 --steps 100
    fastdiff eval fid runs/shapes --data shapes --n 2000 --steps 50 --kid
    fastdiff eval fid samples.npz --data shapes --features inception \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth

A run folder is sampled exactly as `fastdiff sample` samples it (same labels, guidance,
seed and noise contract), so `eval fid` measures the images users get.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fastdiff.cli.sample import add_sampler_options, class_labels, draw, load_for_sampling
from fastdiff.cli.train import DEFAULT_FEATURE_STEPS
from fastdiff.errors import UserError
from fastdiff.options import positive_int


# --------------------------------------------------------------------------- eval fid
def _add_fid_parser(eval_subparsers) -> None:
    e = eval_subparsers.add_parser(
        "fid", help="FID (and optionally KID, precision/recall) of samples against a dataset",
        description="Fréchet distance between feature statistics of generated samples and of a reference "
        "dataset. SOURCE is a run folder (samples are drawn with DDIM/DDPM) or an .npz of samples (uint8 "
        "NHWC 'images', as `fastdiff sample` writes). FID is biased upwards at small n: compare numbers "
        "only at equal --n and with the same features.")
    e.add_argument("source", help="run folder (holding checkpoint.json) or .npz of samples")
    e.add_argument("--data", required=True, help="reference dataset, as for train")
    e.add_argument("--split", choices=("train", "test"), default="train",
                   help="reference split where the dataset has one (default: train)")
    e.add_argument("--features", choices=("shapes", "inception"), default="shapes",
                   help="feature network: the project's shapes CNN (default) or the FID Inception-v3")
    e.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="state dict of the FID Inception-v3 (pt_inception-2015-12-05-6726825d.pth); "
                   "required with --features inception, never downloaded")
    e.add_argument("--shapes-features", default=None, metavar="PATH",
                   help="trained shapes feature network (folder from `fastdiff train-features`); default: "
                   "train one into a cache folder next to SOURCE if none is there yet")
    e.add_argument("--features-steps", type=positive_int, default=DEFAULT_FEATURE_STEPS,
                   help=f"training steps for that on-the-fly network (default: {DEFAULT_FEATURE_STEPS})")
    e.add_argument("--features-dataset-size", type=positive_int, default=4000,
                   help="generated shapes to train that network on (default: 4000)")
    e.add_argument("--n", type=positive_int, default=2000,
                   help="number of generated and of reference images (default: 2000; an .npz with fewer "
                   "images uses all it has)")
    add_sampler_options(e)
    e.add_argument("--kid", action="store_true", help="also report KID (mean ± std over subsets)")
    e.add_argument("--kid-subsets", type=positive_int, default=100)
    e.add_argument("--kid-subset-size", type=positive_int, default=1000)
    e.add_argument("--precision-recall", action="store_true",
                   help="also report improved precision/recall (k=3 nearest neighbours)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.set_defaults(func=cmd_eval_fid)


def _generated_images(args, source: Path):
    """-> (uint8 ImageDataset of samples, description, base folder for caches)."""
    from fastdiff.data import load_npz

    if source.is_file():
        if source.suffix != ".npz":
            raise UserError(f"{source}: expected a run folder or an .npz of samples")
        ds = load_npz(source, size=None)  # uint8 as `fastdiff sample` writes; floats in [0,1]/[-1,1] also work
        return ds, f"{source} ({len(ds)} images)", source.parent
    if source.is_dir():
        return _sample_run(args, source), f"run {source}", source
    raise FileNotFoundError(f"{source}: no such run folder or .npz file")


def _sample_run(args, run: Path):
    from fastdiff.data import ImageDataset, to_uint8

    model, origin = load_for_sampling(str(run), args.no_ema)
    labels, n, _ = class_labels(model, args.n)
    print(f"sampling {n} images from {run} ({origin}, {args.sampler}, {args.steps} steps, eta={args.eta})",
          flush=True)
    x, _ = draw(model, n, labels, args)
    return ImageDataset(to_uint8(x), labels, name=str(run))  # quantised like saved samples


def _extractor(args, base: Path, image_size: int):
    from fastdiff.metrics.features import SHAPES_RECORD, InceptionV3Features, load_shapes_features
    from fastdiff.train.features import train_shapes_features

    if args.features == "inception":
        if not args.inception_weights:
            raise UserError("--features inception needs --inception-weights PATH (the FID Inception-v3 state "
                              "dict, pt_inception-2015-12-05-6726825d.pth); nothing is downloaded")
        return InceptionV3Features(args.inception_weights)
    if args.inception_weights:
        raise UserError("--inception-weights is given but --features is 'shapes'; add --features inception")
    if args.shapes_features:
        return load_shapes_features(args.shapes_features)
    # trained at the samples' size (at least 12, the generator's smallest); others are resized to it
    size = max(12, image_size)
    cache = base / "fid-cache" / f"shapes-features-{size}px-steps{args.features_steps}-seed{args.seed}"
    if (cache / SHAPES_RECORD).is_file():
        print(f"using the cached shapes feature network in {cache}", flush=True)
    else:
        print(f"no --shapes-features given: training the shapes feature network ({args.features_steps} steps, "
              f"seed {args.seed}, {size}x{size} images) into {cache}", flush=True)
        t0 = time.time()
        train_shapes_features(cache, steps=args.features_steps, seed=args.seed, image_size=size,
                              dataset_size=args.features_dataset_size, progress=not args.no_progress)
        print(f"trained in {time.time() - t0:.1f}s", flush=True)
    return load_shapes_features(cache)


def _features(extractor, dataset, n: int, batch_size: int):
    import numpy as np

    out = []
    for start in range(0, n, batch_size):
        x, _ = dataset.batch(range(start, min(n, start + batch_size)))
        out.append(extractor(x).double().numpy())
    return np.concatenate(out)


def cmd_eval_fid(args: argparse.Namespace) -> int:
    from fastdiff.data import load_dataset
    from fastdiff.metrics import fid_from_features, kid, precision_recall

    t0 = time.time()
    source = Path(args.source).expanduser()
    generated, what, base = _generated_images(args, source)
    n_gen = min(args.n, len(generated))
    if n_gen < 2:
        raise UserError(f"{source}: FID needs at least 2 generated images, got {n_gen}")
    size = generated.shape[-1]
    extractor = _extractor(args, base, size)
    reference = load_dataset(args.data, image_size=size, train=args.split == "train", seed=0,
                             n=args.n if args.data == "shapes" else None)
    n_ref = min(args.n, len(reference))
    if n_ref < 2:
        raise UserError(f"{args.data}: FID needs at least 2 reference images, got {n_ref}")
    f_gen = _features(extractor, generated, n_gen, args.batch_size)
    f_ref = _features(extractor, reference, n_ref, args.batch_size)
    fid = fid_from_features(f_ref, f_gen)
    result = {"fid": fid, "features": extractor.name, "feature_dim": int(f_gen.shape[1]), "source": str(source),
              "n_generated": n_gen, "data": args.data, "split": args.split, "n_reference": n_ref}
    line = f"FID: {fid:.4f} ({extractor.name}, {n_gen} generated vs {n_ref} {args.data} {args.split} images)"
    if args.kid:
        subset = min(args.kid_subset_size, n_gen, n_ref)
        kid_mean, kid_std = kid(f_ref, f_gen, subsets=args.kid_subsets, subset_size=subset, seed=args.seed)
        result.update(kid=kid_mean, kid_std=kid_std, kid_subsets=args.kid_subsets, kid_subset_size=subset)
        line += f"\nKID: {kid_mean:.6f} ± {kid_std:.6f} (std over {args.kid_subsets} subsets of {subset})"
    if args.precision_recall:
        precision, recall = precision_recall(f_ref, f_gen, k=3)
        result.update(precision=precision, recall=recall)
        line += f"\nprecision: {precision:.4f}, recall: {recall:.4f} (k=3)"
    result["seconds"] = round(time.time() - t0, 2)
    print(line + f"\n({what}; {result['seconds']:.1f}s)")
    if args.json:
        from fastdiff.io import atomic_write_bytes
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(result, indent=1).encode())
    return 0


# --------------------------------------------------------------------------- eval bpd
def cmd_eval_bpd(a: argparse.Namespace) -> int:
    import math

    import torch

    from fastdiff.data import load_dataset
    from fastdiff.sampling import space_timesteps

    model, origin = load_for_sampling(a.dir, a.no_ema)
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
    print(f"bits/dim: {mean:.4f} ± {half:.4f} (95% CI; n={n}, {what}, {a.split} split, {origin}, "
          f"{time.time() - t0:.1f}s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"bpd": mean, "ci95": half, "n": n, "T": d.T, "split": a.split,
                                            "source": a.dir}, indent=1))
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run", description="Evaluate a trained run.")
    esub = p.add_subparsers(dest="metric", metavar="METRIC")
    esub.required = True
    e = esub.add_parser("bpd", help="bits/dim (variational bound) with a 95%% confidence interval",
                        description="Bits/dim by the full variational bound: T model evaluations per batch. "
                        "--steps S evaluates the bound of the process respaced to S steps (an upper bound "
                        "that is looser than the full one, but S/T of the cost).")
    e.add_argument("dir", help="run folder (holding checkpoint.json) or exported model file")
    e.add_argument("--data", required=True, help="dataset, as for train")
    e.add_argument("--n", type=positive_int, default=256, help="number of images (default: 256)")
    e.add_argument("--steps", type=positive_int, default=None, help="respaced process length (default: T)")
    e.add_argument("--batch-size", type=positive_int, default=64)
    e.add_argument("--split", choices=("test", "train"), default="test",
                   help="held-out split where the dataset has one (default: test)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-ema", action="store_true")
    e.add_argument("--json", default=None, help="also write the result to this JSON file")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval_bpd)
    _add_fid_parser(esub)
