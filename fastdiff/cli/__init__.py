"""The `fastdiff` command line: one module per command group, each with `register(subparsers)`.

    fastdiff train --data shapes --out runs/shapes --steps 2000          (cli/train.py)
    fastdiff sample runs/shapes --n 64 --steps 50 --eta 0 --out s.png    (cli/sample.py)
    fastdiff eval bpd runs/shapes --data shapes --n 256 --steps 100      (cli/eval.py)
    fastdiff demo; fastdiff reproduce --quick                            (cli/experiments.py)

Exit codes: 0 success; 1 a run-time problem with a file or the data (missing, unreadable,
malformed; training stopped on non-finite losses); 2 a usage mistake. Such errors print one
line; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from fastdiff.cli import eval as eval_commands
from fastdiff.cli import autoencoder, experiments, sample, train
from fastdiff.errors import InputError, UserError


def build_parser() -> argparse.ArgumentParser:
    from fastdiff import __version__

    parser = argparse.ArgumentParser(prog="fastdiff", description="Fast, correct diffusion models: train a DDPM "
                                     "U-Net, sample it (DDIM/DDPM), measure its bits/dim and FID.")
    parser.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in (train, autoencoder, sample, eval_commands, experiments):
        group.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"fastdiff {args.command}: error: {e}", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"fastdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
