"""`fastdiff train-autoencoder`: the KL autoencoder of latent diffusion (fastdiff.train.autoencoder).
Its options come from AutoencoderConfig's fields (fastdiff.options): declared once."""
from __future__ import annotations

import argparse
import sys

from fastdiff.errors import UserError
from fastdiff.options import add_options, from_options


def cmd_train_autoencoder(a: argparse.Namespace) -> int:
    from fastdiff.train.autoencoder import AutoencoderConfig, train_autoencoder

    try:
        config = from_options(AutoencoderConfig, a).validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    result = train_autoencoder(config)
    if result.status == "nonfinite":
        print(f"fastdiff train-autoencoder: {result.message}", file=sys.stderr)
        return 1
    if result.message:
        print(f"fastdiff train-autoencoder: {result.message}", file=sys.stderr)
    print(f"trained to step {result.step} in {result.seconds:.1f}s ({result.steps_per_s:.2f} steps/s); held-out "
          f"reconstruction PSNR {result.psnr_db:.2f} dB; latent scaling factor {result.scaling_factor:.5g}; "
          f"the EMA autoencoder is in {result.out} (fastdiff.load_model or diffusers' "
          f"AutoencoderKL.from_pretrained read it)")
    return 0


def register(sub) -> None:
    from fastdiff.train.autoencoder import AutoencoderConfig

    p = sub.add_parser("train-autoencoder", help="train the KL autoencoder of latent diffusion",
                       description="Train a KL-regularised autoencoder (Rombach et al. 2022): L1 or L2 "
                       "reconstruction + a small KL, optionally a patch-GAN after a warm-up and a perceptual "
                       "term from a TorchScript file you give. Checkpoints (exact --resume), reconstructions, "
                       "the held-out PSNR and the latent scaling factor go to --out, which also becomes a "
                       "diffusers AutoencoderKL folder (for `fastdiff train --autoencoder`).")
    add_options(p, AutoencoderConfig)
    p.set_defaults(func=cmd_train_autoencoder)
