"""`fastdiff demo` and `fastdiff reproduce`."""
from __future__ import annotations

import argparse
from typing import List

from fastdiff.errors import UserError
from fastdiff.options import positive_float, positive_int
from fastdiff.runtime import free_threads

DEMO_OUT = "fastdiff-demo"


def cmd_demo(a: argparse.Namespace) -> int:
    from fastdiff.experiments.demo import run_demo
    from fastdiff.io import check_output_dir
    from fastdiff.train.config import MAX_IMAGE_SIZE

    if a.image_size > MAX_IMAGE_SIZE:
        raise UserError(f"--image-size must be at most {MAX_IMAGE_SIZE}, got {a.image_size}")
    check_output_dir(a.out)
    if a.latent or a.autoencoder:
        from fastdiff.experiments.demo import run_latent_demo
        out = a.out if a.out != DEMO_OUT else DEMO_OUT + "-latent"
        run_latent_demo(out=out, minutes=a.minutes, autoencoder=a.autoencoder, batch_size=a.batch_size, n=a.n,
                        seed=a.seed, lr=a.lr, dataset_size=a.dataset_size, threads=a.threads)
        return 0
    run_demo(out=a.out, minutes=a.minutes, preset=a.preset, batch_size=a.batch_size, n=a.n, seed=a.seed,
             lr=a.lr, dataset_size=a.dataset_size, fp32=a.fp32, image_size=a.image_size, threads=a.threads)
    return 0


def _experiment_list(s: str) -> List[int]:
    from fastdiff.experiments.reproduce import EXPERIMENTS

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
    from fastdiff.experiments.reproduce import MATPLOTLIB_HINT, reproduce

    try:
        import matplotlib  # noqa: F401
        import scipy  # noqa: F401
    except ImportError:
        raise UserError(MATPLOTLIB_HINT) from None
    from fastdiff.io import check_output_dir

    check_output_dir(a.out)
    threads = a.threads if a.threads is not None else free_threads(announce="fastdiff reproduce")
    argv = ["fastdiff reproduce"] + (["--quick"] if a.quick else []) + ["--out", a.out, "--seed", str(a.seed),
                                                                       "--threads", str(threads)]
    if a.only:
        argv += ["--only", ",".join(map(str, a.only))]
    path = reproduce(a.out, quick=a.quick, seed=a.seed, only=a.only, threads=threads,
                     progress=not a.no_progress, command=" ".join(argv))
    print(f"fastdiff reproduce: report written to {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a small model on the embedded shapes and sample it (minutes, CPU)",
                       description="Train a small class-conditional U-Net on the embedded 'shapes' data within a "
                       "wall-clock budget, then draw a DDIM-50 grid (one row per class). Writes samples.png, "
                       "loss.png, speed.json and README.md to --out.")
    p.add_argument("--out", default=DEMO_OUT, help="output folder (default: fastdiff-demo, fastdiff-demo-latent "
                   "with --latent)")
    p.add_argument("--minutes", type=positive_float, default=9.0,
                   help="total wall-clock budget, sampling included (default: 9)")
    p.add_argument("--preset", default=None, help="U-Net preset (default: demo)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--n", type=positive_int, default=100, help="samples in the grid (default: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (default: 2e-3)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: the cores not kept busy by other processes)")
    p.add_argument("--image-size", type=positive_int, default=16,
                   help="resolution of the rendered shapes (default: 16; 32 is 4x the cost per step)")
    p.add_argument("--fp32", action="store_true", help="train in fp32 (default: bf16 autocast + channels_last)")
    p.add_argument("--dataset-size", type=positive_int, default=10000,
                   help="size of the generated shapes set (default: 10000)")
    p.add_argument("--latent", action="store_true", help="latent diffusion: train an autoencoder (f = 4) on 32x32 "
                   "shapes, then a U-Net on its latents, and sample through the decoder")
    p.add_argument("--autoencoder", default=None, metavar="DIR", help="with --latent: use this autoencoder folder "
                   "(e.g. tests/data/shapes32-ae) instead of training one")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("reproduce", help="reproduce the thesis's claims at small scale: REPORT.md + plots",
                       description="Run the small experiments (noise schedules; L_simple/L_hybrid/L_vlb; the DDIM "
                       "eta x steps table; fixed vs learned variance under respacing; oracle convergence and the ODE "
                       "solvers' orders; FID-like vs NFE for the fast solvers; ODE vs VLB bits/dim; ...) on the "
                       "embedded shapes and the oracle kit, and write REPORT.md with PNG plots to --out. Trained "
                       "models and results are cached in --out: a rerun resumes. The full run takes about an hour on "
                       "2 CPU cores; --quick a few minutes. Needs matplotlib (pip install \"fastdiff[report]\").")
    p.add_argument("--quick", action="store_true", help="reduced settings (minutes; checks the pipeline, not the "
                   "papers' trends)")
    p.add_argument("--out", default="fastdiff-reproduce", help="output folder (default: fastdiff-reproduce)")
    p.add_argument("--seed", type=int, default=0, help="seed of training, sampling and evaluation (default: 0)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: the cores not kept busy by other processes)")
    p.add_argument("--only", type=_experiment_list, default=None, metavar="LIST",
                   help="run only these experiments, e.g. 1,3 (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce)
