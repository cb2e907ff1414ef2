"""`fastdiff train`, `fastdiff train-classifier` and `fastdiff train-features`. Their options
come from the config dataclasses' fields (fastdiff.options): declared once."""
from __future__ import annotations

import argparse
import json
import sys
import time

from fastdiff.errors import UserError
from fastdiff.options import add_options, from_options, positive_int

DEFAULT_FEATURE_STEPS = 400


def _validated(config):
    try:
        return config.validate()
    except ValueError as e:
        raise UserError(str(e)) from None


def cmd_train(a: argparse.Namespace) -> int:
    from fastdiff.train import TrainConfig, train

    result = train(_validated(from_options(TrainConfig, a)))
    if result.status == "nonfinite":
        print(f"fastdiff train: {result.message}", file=sys.stderr)
        return 1
    if result.message:  # the time budget ran out, or steps were skipped
        print(f"fastdiff train: {result.message}", file=sys.stderr)
    print(f"trained to step {result.step} in {result.seconds:.1f}s ({result.steps_per_s:.2f} steps/s, "
          f"{result.samples_per_s:.1f} samples/s); checkpoint in {result.out}")
    return 0


def check_image_size(size: int, flag: str = "--image-size") -> None:
    from fastdiff.train.config import MAX_IMAGE_SIZE

    if size > MAX_IMAGE_SIZE:
        raise UserError(f"{flag} must be at most {MAX_IMAGE_SIZE}, got {size}")


def cmd_train_classifier(a: argparse.Namespace) -> int:
    from fastdiff.io import check_output_dir
    from fastdiff.train.classifier import ClassifierConfig, train_classifier

    cfg = _validated(from_options(ClassifierConfig, a))
    check_image_size(cfg.image_size)
    check_output_dir(cfg.out)
    out = train_classifier(cfg)
    print(f"classifier trained for {cfg.steps} steps: {out}")
    return 0


def cmd_train_features(args: argparse.Namespace) -> int:
    from fastdiff.io import check_output_dir
    from fastdiff.metrics.features import SHAPES_RECORD
    from fastdiff.train.features import train_shapes_features

    check_image_size(args.image_size)
    check_output_dir(args.out)
    t0 = time.time()
    out = train_shapes_features(args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                                dataset_size=args.dataset_size, image_size=args.image_size,
                                progress=not args.no_progress)
    record = json.loads((out / SHAPES_RECORD).read_text())
    print(f"shapes features: {args.steps} steps in {time.time() - t0:.1f}s, held-out accuracy "
          f"{record['held_out_accuracy']:.3f} (n={record['held_out_n']}), {record['feature_dim']}-d features; "
          f"saved to {out}")
    return 0


def register(sub) -> None:
    from fastdiff.train import TrainConfig
    from fastdiff.train.classifier import ClassifierConfig

    p = sub.add_parser("train", help="train a U-Net", description="Train a U-Net; checkpoints, sample grids and a "
                       "loss curve go to --out. Under torchrun, trains with DistributedDataParallel.")
    add_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-classifier", help="train a noisy classifier for classifier guidance",
                       description="Train a time-conditioned classifier of noised images x_t (Dhariwal & Nichol), "
                       "for `fastdiff sample --classifier DIR`. Use the diffusion model's schedule and T.")
    add_options(p, ClassifierConfig)
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("train-features", help="train the shapes feature network used by `eval fid`",
                       description="Train a small CNN to classify the embedded 'shapes' data; its "
                       "penultimate layer is the feature space of `fastdiff eval fid --features shapes`. "
                       "Writes shapes_features.safetensors and shapes_features.json to --out.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_FEATURE_STEPS,
                   help=f"training steps (default: {DEFAULT_FEATURE_STEPS}; a few minutes on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--dataset-size", type=positive_int, default=4000, help="generated shapes to train on")
    p.add_argument("--image-size", type=positive_int, default=32,
                   help="image size to train at, that of the samples it will judge (default: 32)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_features)
