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
