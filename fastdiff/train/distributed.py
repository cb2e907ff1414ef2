"""DistributedDataParallel set-up under torchrun (env:// contract: WORLD_SIZE, RANK, LOCAL_RANK)."""
from __future__ import annotations

import os
from typing import Tuple

import torch
import torch.distributed as dist

from fastdiff.runtime import resolve_device


def setup(device_name: str) -> Tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins the process group when WORLD_SIZE > 1
    (NCCL on GPUs, gloo on CPUs). Under torchrun each rank takes CUDA device LOCAL_RANK unless
    a device index was given."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, local = 0, 0
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return rank, world, device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def all_gather_cat(t: torch.Tensor, world: int) -> torch.Tensor:
    """The concatenation of every rank's `t` (same shape on every rank)."""
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def from_rank0(flag: bool, world: int, device: torch.device) -> bool:
    """Rank 0's decision, broadcast to every rank (NCCL needs device tensors)."""
    if world == 1:
        return flag
    s = torch.tensor([float(flag)], device=device)
    dist.broadcast(s, 0)
    return bool(s.item())


def batch_aligned_share(count: int, batch_size: int, rank: int, world: int) -> Tuple[int, int]:
    """[start, stop) of `count` items that rank `rank` of `world` takes: a contiguous block of
    whole batches of `batch_size`, the blocks in rank order. Every batch a rank processes is
    then a batch one process processes too (same items, same size), so per-batch results
    (features, samples) are the single process's, and their concatenation in rank order is the
    single process's output. A rank may get nothing (fewer batches than ranks)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = -(-count // batch_size)
    first, last = rank * batches // world, (rank + 1) * batches // world
    return min(count, first * batch_size), min(count, last * batch_size)


def gather_rows(rows: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """The concatenation, in rank order, of every rank's 2-D `rows` (counts may differ, zero
    included; the column count and dtype must agree), on every rank, on the CPU. One padded
    all_gather (after one of the counts): NCCL and gloo both have it, unlike an uneven gather."""
    if rows.dim() != 2:
        raise ValueError(f"rows must be 2-D (N, F), got shape {tuple(rows.shape)}")
    if world == 1:
        return rows.cpu()
    count = torch.tensor([rows.shape[0]], device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros((max(counts), rows.shape[1]), dtype=rows.dtype, device=device)
    padded[:rows.shape[0]] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c].cpu() for p, c in zip(parts, counts)])


def teardown(world: int) -> None:
    """Destroy the process group with every rank at the same point: a rank that tore down while
    rank 0 still worked alone (writing the report) was seen to abort at exit ("terminate called
    without an active exception", SIGABRT) in a clean CI run of tests/test_distributed_eval.py."""
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
