"""Sampling many images as shards: split the sample indices into fixed shards, let rank r of
`world` processes (torchrun) draw its share, write each shard atomically, skip finished shards
on a rerun, and read the folder back as one array.

Why the union is bitwise the single-process output: sample i's noise is a function of
(seed, i, step, element) only (`fastdiff.ops.randn`, `fastdiff.ops.sampler_step`), and a
shard's boundaries are multiples of the forward batch size, so every forward pass a rank runs
is one that a single process runs too, on the same samples.

A shard folder holds:
    manifest.json            the request: `samples` (their number), `shard_size`, and what chose
                             the samples (seed, sampler settings, source...)
    shard-00000.npz ...      uint8 NHWC `images`, `indices` (and `labels`); written last, atomically:
                             its presence marks the shard finished
    images/000000.png ...    one PNG per sample, named by its sample index
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from fastdiff.data import to_uint8
from fastdiff.io import atomic_write_bytes

MANIFEST = "manifest.json"
IMAGES_DIR = "images"


@dataclass(frozen=True)
class ShardPlan:
    """n samples cut into consecutive shards of `shard_size` (the last may be shorter)."""
    n: int
    shard_size: int

    def __post_init__(self):
        for name in ("n", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    @property
    def num_shards(self) -> int:
        return -(-self.n // self.shard_size)

    def bounds(self, k: int) -> Tuple[int, int]:
        """[start, stop) sample indices of shard k."""
        if not 0 <= k < self.num_shards:
            raise IndexError(f"shard {k} is outside [0, {self.num_shards})")
        start = k * self.shard_size
        return start, min(self.n, start + self.shard_size)


def shard_path(out_dir, k: int) -> Path:
    return Path(out_dir) / f"shard-{k:05d}.npz"


def is_shard_folder(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def finished_shards(out_dir, plan: ShardPlan) -> List[int]:
    return [k for k in range(plan.num_shards) if shard_path(out_dir, k).is_file()]


def assign(unfinished: Sequence[int], rank: int, world: int) -> List[int]:
    """Rank r's shards: every world-th of the unfinished ones, so a resumed run stays balanced."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    return list(unfinished[rank::world])


def prepare_folder(out_dir, manifest: Dict) -> None:
    """Create the folder and its manifest, or check that an existing one asks for the same
    samples (mixing shards drawn with other settings would give a silently wrong union).
    Call it on one rank, before the others list the finished shards."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    want = json.loads(json.dumps(manifest))  # the form it takes on disk (tuples become lists)
    if path.is_file():
        have = json.loads(path.read_text())
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if diff:
            details = ", ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff)
            raise ValueError(f"{out} holds shards of other samples ({details}); use another --out folder "
                             f"or delete it")
        return
    if any(out.glob("shard-*.npz")):
        raise ValueError(f"{out} holds shards but no {MANIFEST}; use another --out folder or delete it")
    atomic_write_bytes(path, (json.dumps(want, indent=1) + "\n").encode())


def _write_png(path: Path, image_hwc: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc).save(tmp, format="PNG")
    os.replace(tmp, path)


def write_pngs(out_dir, images_nhwc: np.ndarray, start: int, only_missing: bool = False) -> None:
    folder = Path(out_dir) / IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for j, img in enumerate(images_nhwc):
        path = folder / f"{start + j:06d}.png"
        if not (only_missing and path.is_file()):
            _write_png(path, img)


def write_shard(out_dir, k: int, start: int, images: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
    """Shard k (samples start, start+1, ...): the PNGs, then the .npz, atomically (the marker
    that the shard is finished). `images`: float in [-1, 1] or uint8, (N, C, H, W)."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    nhwc = images.permute(0, 2, 3, 1).cpu().numpy()
    write_pngs(out_dir, nhwc, start)
    arrays = {"images": nhwc, "indices": np.arange(start, start + len(nhwc), dtype=np.int64)}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = shard_path(out_dir, k)
    atomic_write_bytes(path, buf.getvalue(), tag=str(k))


def read_shard(out_dir, k: int) -> Dict[str, np.ndarray]:
    with np.load(shard_path(out_dir, k), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def read_shards(out_dir) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(uint8 NHWC images, labels or None) of a complete shard folder, in sample order."""
    out = Path(out_dir)
    if not is_shard_folder(out):
        raise FileNotFoundError(f"{out}: not a shard folder (no {MANIFEST})")
    manifest = json.loads((out / MANIFEST).read_text())
    plan = ShardPlan(int(manifest["samples"]), int(manifest["shard_size"]))
    missing = [k for k in range(plan.num_shards) if not shard_path(out, k).is_file()]
    if missing:
        raise FileNotFoundError(f"{out}: {len(missing)} of {plan.num_shards} shards are not written yet "
                                f"(first missing: {shard_path(out, missing[0]).name}); rerun the same "
                                f"`fastdiff sample` command to finish them")
    images, labels = [], []
    for k in range(plan.num_shards):
        z = read_shard(out, k)
        start, stop = plan.bounds(k)
        if z["indices"].tolist() != list(range(start, stop)):
            raise ValueError(f"{shard_path(out, k)} holds samples {z['indices'][:1]}.. but shard {k} is "
                             f"[{start}, {stop})")
        images.append(z["images"])
        labels.append(z.get("labels"))
    has_labels = labels[0] is not None
    return np.concatenate(images), (np.concatenate(labels) if has_labels else None)


def sample_shards(draw: Callable[[int, int], Tuple[torch.Tensor, Optional[torch.Tensor]]], plan: ShardPlan,
                  out_dir, rank: int = 0, world: int = 1, log: Callable[[str], None] = lambda msg: None) -> List[int]:
    """Draw this rank's unfinished shards with draw(start, stop) -> (images, labels) and write
    them; returns the shard indices written. Finished shards are skipped (their missing PNGs,
    if a crash lost any, are rewritten from the .npz)."""
    done = set(finished_shards(out_dir, plan))
    todo = assign([k for k in range(plan.num_shards) if k not in done], rank, world)
    for k in sorted(done)[rank::world]:
        z = read_shard(out_dir, k)
        write_pngs(out_dir, z["images"], plan.bounds(k)[0], only_missing=True)
    log(f"rank {rank}/{world}: {len(done)} of {plan.num_shards} shards already finished, drawing {len(todo)}")
    for k in todo:
        start, stop = plan.bounds(k)
        images, labels = draw(start, stop)
        if images.shape[0] != stop - start:
            raise RuntimeError(f"draw({start}, {stop}) returned {images.shape[0]} images")
        write_shard(out_dir, k, start, images, labels)
        log(f"rank {rank}: shard {k} (samples {start}..{stop - 1}) written")
    return todo


def load_shard_folder(out_dir):
    """A complete shard folder as a uint8 ImageDataset (what `fastdiff eval fid` reads)."""
    from fastdiff.data import ImageDataset

    images, labels = read_shards(out_dir)
    return ImageDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                        None if labels is None else torch.from_numpy(labels), name=str(out_dir))
