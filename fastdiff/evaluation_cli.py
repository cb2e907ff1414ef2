"""Command-line parts for sample quality: `fastdiff eval fid` and `fastdiff train-features`.

    fastdiff train-features --out runs/shapes-features --steps 400 --seed 0
    fastdiff eval fid runs/shapes --data shapes --n 2000 --steps 50 --kid
    fastdiff eval fid samples.npz --data shapes --features inception \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth

`fastdiff.cli` wires these in with `add_fid_parser(eval_subparsers)` and
`add_train_features_parser(subparsers)`; each sets `func` on its parser.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fastdiff.cli import UserError, _nonneg_float, _positive_int  # cli imports this module lazily

DEFAULT_FEATURE_STEPS = 400


def _user_error(message: str) -> Exception:
    return UserError(message)


# --------------------------------------------------------------------------- train-features
def add_train_features_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train-features", help="train the shapes feature network used by `eval fid`",
                              description="Train a small CNN to classify the embedded 'shapes' data; its "
                              "penultimate layer is the feature space of `fastdiff eval fid --features shapes`. "
                              "Writes shapes_features.safetensors and shapes_features.json to --out.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=_positive_int, default=DEFAULT_FEATURE_STEPS,
                   help=f"training steps (default: {DEFAULT_FEATURE_STEPS}; a few minutes on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--dataset-size", type=_positive_int, default=4000, help="generated shapes to train on")
    p.add_argument("--image-size", type=_positive_int, default=32,
                   help="image size to train at, that of the samples it will judge (default: 32)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_features)
    return p


def cmd_train_features(args: argparse.Namespace) -> int:
    from fastdiff.evaluation import SHAPES_RECORD, train_shapes_features

    t0 = time.time()
    out = train_shapes_features(args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                                dataset_size=args.dataset_size, image_size=args.image_size,
                                progress=not args.no_progress)
    record = json.loads((out / SHAPES_RECORD).read_text())
    print(f"shapes features: {args.steps} steps in {time.time() - t0:.1f}s, held-out accuracy "
          f"{record['held_out_accuracy']:.3f} (n={record['held_out_n']}), {record['feature_dim']}-d features; "
          f"saved to {out}")
    return 0


# --------------------------------------------------------------------------- eval fid
def add_fid_parser(eval_subparsers) -> argparse.ArgumentParser:
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
    e.add_argument("--features-steps", type=_positive_int, default=DEFAULT_FEATURE_STEPS,
                   help=f"training steps for that on-the-fly network (default: {DEFAULT_FEATURE_STEPS})")
    e.add_argument("--features-dataset-size", type=_positive_int, default=4000,
                   help="generated shapes to train that network on (default: 4000)")
    e.add_argument("--n", type=_positive_int, default=2000,
                   help="number of generated and of reference images (default: 2000; an .npz with fewer "
                   "images uses all it has)")
    e.add_argument("--steps", type=_positive_int, default=50, help="sampler steps for a run folder (default: 50)")
    e.add_argument("--eta", type=_nonneg_float, default=0.0, help="DDIM eta for a run folder (default: 0)")
    e.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    e.add_argument("--no-ema", action="store_true", help="sample with the raw weights, not the EMA")
    e.add_argument("--kid", action="store_true", help="also report KID (mean ± std over subsets)")
    e.add_argument("--kid-subsets", type=_positive_int, default=100)
    e.add_argument("--kid-subset-size", type=_positive_int, default=1000)
    e.add_argument("--precision-recall", action="store_true",
                   help="also report improved precision/recall (k=3 nearest neighbours)")
    e.add_argument("--batch-size", type=_positive_int, default=64)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval_fid)
    return e


def _generated_images(args, source: Path):
    """-> (uint8 ImageDataset of samples, description, base folder for caches)."""
    from fastdiff.data import load_npz

    if source.is_file():
        if source.suffix != ".npz":
            raise _user_error(f"{source}: expected a run folder or an .npz of samples")
        ds = load_npz(source, size=None)  # uint8 as `fastdiff sample` writes; floats in [0,1]/[-1,1] also work
        return ds, f"{source} ({len(ds)} images)", source.parent
    if source.is_dir():
        return _sample_run(args, source), f"run {source}", source
    raise FileNotFoundError(f"{source}: no such run folder or .npz file")


def _sample_run(args, run: Path):
    import torch

    import fastdiff
    from fastdiff.data import ImageDataset, to_uint8
    from fastdiff.train import load_checkpoint

    model, record = load_checkpoint(run, ema=not args.no_ema)
    if args.steps > model.diffusion.T:
        raise _user_error(f"--steps {args.steps} exceeds the model's T={model.diffusion.T}")
    print(f"sampling {args.n} images from {run} (step {record['step']}, {args.sampler}, {args.steps} steps, "
          f"eta={args.eta})", flush=True)
    chunks, labels_all = [], []
    for b, start in enumerate(range(0, args.n, args.batch_size)):
        n = min(args.batch_size, args.n - start)
        kwargs = {}
        if model.num_classes:  # balanced classes, continuing across batches
            labels = torch.arange(start, start + n) % model.num_classes
            kwargs["y"] = labels
            labels_all.append(labels)
        # the sampler's noise depends on (seed, index in batch): give each batch its own seed
        x = fastdiff.sample(model, n=n, steps=args.steps, eta=args.eta, seed=args.seed * 1_000_003 + b,
                            sampler=args.sampler, model_kwargs=kwargs, progress=not args.no_progress)
        chunks.append(to_uint8(x))  # quantised like saved samples
    return ImageDataset(torch.cat(chunks), torch.cat(labels_all) if labels_all else None, name=str(run))


def _extractor(args, base: Path, image_size: int):
    from fastdiff.evaluation import (SHAPES_RECORD, InceptionV3Features, load_shapes_features,
                                     train_shapes_features)

    if args.features == "inception":
        if not args.inception_weights:
            raise _user_error("--features inception needs --inception-weights PATH (the FID Inception-v3 state "
                              "dict, pt_inception-2015-12-05-6726825d.pth); nothing is downloaded")
        return InceptionV3Features(args.inception_weights)
    if args.inception_weights:
        raise _user_error("--inception-weights is given but --features is 'shapes'; add --features inception")
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
    from fastdiff.evaluation import fid_from_features, kid, precision_recall

    t0 = time.time()
    source = Path(args.source).expanduser()
    generated, what, base = _generated_images(args, source)
    n_gen = min(args.n, len(generated))
    if n_gen < 2:
        raise _user_error(f"{source}: FID needs at least 2 generated images, got {n_gen}")
    size = generated.shape[-1]
    extractor = _extractor(args, base, size)
    reference = load_dataset(args.data, image_size=size, train=args.split == "train", seed=0,
                             n=args.n if args.data == "shapes" else None)
    n_ref = min(args.n, len(reference))
    if n_ref < 2:
        raise _user_error(f"{args.data}: FID needs at least 2 reference images, got {n_ref}")
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
        from fastdiff.train import atomic_write_bytes
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(result, indent=1).encode())
    return 0
