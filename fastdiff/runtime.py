"""Where work runs: device choice and thread count, shared by training, sampling and the commands."""
from __future__ import annotations

import os
import re

import torch

from fastdiff.errors import UserError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch.device for "auto" | "cpu" | "cuda" | "cuda:i".

    "auto" is the current CUDA device when one is visible, else the CPU. Asking for a CUDA
    device that is not there is an error, never a silent move to the CPU."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise UserError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:i', got {name!r}")
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} was requested but torch sees no CUDA GPU "
                            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"device {name!r} was requested but only {count} CUDA device(s) exist "
                            f"(cuda:0 .. cuda:{count - 1})")
    return device


def free_threads(default: int = 0, announce: str = "") -> int:
    """torch's thread count less the cores other processes keep busy (1-minute load average):
    OpenMP threads that wait on a taken core cost far more than they bring."""
    default = default or torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        return default
    cores = os.cpu_count() or default
    free = max(1, min(default, int(cores - busy + 0.5)))
    if free < default and announce:
        print(f"{announce}: the machine is busy (load {busy:.1f} on {cores} cores): using {free} thread(s)",
              flush=True)
    return free
