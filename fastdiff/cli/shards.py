"""`fastdiff sample` in shards, on one process or many (torchrun; env:// contract WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):

    torchrun --nproc-per-node 8 -m fastdiff sample RUN --n 50000 --out samples/      # shard folder
    torchrun --nproc-per-node 8 -m fastdiff sample RUN --n 50000 --out s.png         # merged, as one process

Ranks split the shards (fastdiff.sampling.shards), write them atomically and skip finished
ones when the command is run again. With a folder --out (a trailing "/" or an existing folder)
the shards are the output; with a file --out they go to a work folder `<out>.shards/` and rank
0 then writes the PNG grid and .npz exactly as a single `fastdiff sample` process does.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from fastdiff.errors import UserError

DEFAULT_SHARD_BATCHES = 16  # a shard is this many forward batches unless --shard-size says otherwise
# options that change where or how verbosely samples are written, not which samples
_NOT_IN_MANIFEST = {"func", "command", "out", "no_progress", "scale", "shard_size"}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def wants_shards(a: argparse.Namespace) -> bool:
    """Shards when --out is a folder, --shard-size is given, or several ranks run."""
    return is_folder_out(a.out) or getattr(a, "shard_size", None) is not None or world_size() > 1


def is_folder_out(out: str) -> bool:
    return out.endswith(("/", os.sep)) or Path(out).is_dir()


def shard_size_of(a: argparse.Namespace) -> int:
    size = a.shard_size if a.shard_size is not None else a.batch_size * DEFAULT_SHARD_BATCHES
    if size % a.batch_size:
        # a shard boundary inside a forward batch would run batches a single process does not run
        raise UserError(f"--shard-size must be a multiple of --batch-size {a.batch_size}, got {size}")
    return size


def manifest_of(a: argparse.Namespace, n: int, shard_size: int) -> dict:
    options = {k: v for k, v in sorted(vars(a).items()) if k not in _NOT_IN_MANIFEST}
    options["dir"] = str(Path(a.dir).resolve())
    # flat, so that a refused resume names the option that differs
    return {"format": "fastdiff-sample-shards/1", "samples": n, "shard_size": shard_size,
            **json.loads(json.dumps(options, default=str))}


def _prepare_on_rank0(folder: Path, manifest: dict, rank: int, world: int) -> None:
    """Rank 0 writes or checks the manifest; every rank learns whether that failed (a rank
    left waiting at a barrier would hang the job)."""
    import torch

    from fastdiff.sampling.shards import prepare_folder
    from fastdiff.train import distributed

    error = None
    if rank == 0:
        try:
            prepare_folder(folder, manifest)
        except ValueError as e:
            error = e
    if distributed.from_rank0(error is not None, world, torch.device("cpu")):
        raise UserError(str(error) if error is not None else f"rank 0 could not prepare {folder}")


def cmd_sample_shards(a: argparse.Namespace) -> int:
    from fastdiff.cli.fast import optimize_for
    from fastdiff.cli.sample import class_labels, draw, load_for_sampling
    from fastdiff.sampling.shards import ShardPlan, sample_shards
    from fastdiff.train import distributed

    rank, world, _ = distributed.setup("cpu")  # gloo: the ranks only meet at barriers
    try:
        model, origin = load_for_sampling(a.dir, a.no_ema)
        model = optimize_for(model, a, log=print if rank == 0 else (lambda m: None))  # --fast
        classifier = None
        if a.classifier is not None:
            from fastdiff.train.classifier import load_classifier
            classifier = load_classifier(a.classifier)
        labels, n, nrow = class_labels(model, a.n, a.label, a.per_class, classifier)
        plan = ShardPlan(n, shard_size_of(a))
        folder_out = is_folder_out(a.out)
        out = Path(a.out)
        folder = out if folder_out else out.with_name(out.stem + ".shards")
        _prepare_on_rank0(folder, manifest_of(a, n, plan.shard_size), rank, world)
        distributed.barrier(world)  # every rank lists the finished shards after rank 0's check
        if rank != 0:
            a.no_progress = True

        def draw_range(start: int, stop: int):
            part = None if labels is None else labels[start:stop]
            x, _ = draw(model, stop - start, part, a, classifier, sample_offset=start)
            return x, part

        t0 = time.time()
        written = sample_shards(draw_range, plan, folder, rank, world, log=print if rank == 0 else (lambda m: None))
        seconds = time.time() - t0
        distributed.barrier(world)
        if rank == 0:
            if not folder_out:
                _merge(folder, out, nrow, a.scale)
            done = f"{n} samples in {plan.num_shards} shards of {plan.shard_size} on {world} rank(s)"
            where = folder if folder_out else f"{out} and its .npz (shards kept in {folder})"
            print(f"{done}: rank 0 drew {len(written)} shard(s) in {seconds:.1f}s; {where} ({origin})")
    finally:
        if world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


def _merge(folder: Path, out: Path, nrow: int, scale: int) -> None:
    """The PNG grid and .npz of a single `fastdiff sample` process, from a complete shard folder."""
    import numpy as np
    import torch

    from fastdiff.image_utils import save_image_grid
    from fastdiff.sampling.shards import read_shards

    images, labels = read_shards(folder)
    png, npz = (out, out.with_suffix(".npz")) if out.suffix.lower() != ".npz" else (out.with_suffix(".png"), out)
    if png.suffix.lower() != ".png":
        png = png.with_suffix(png.suffix + ".png")
    save_image_grid(torch.from_numpy(images).permute(0, 3, 1, 2), png, nrow=nrow, scale=scale)
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(npz, **arrays)
