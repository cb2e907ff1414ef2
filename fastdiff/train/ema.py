"""Exponential moving average of the weights (the weights that are sampled)."""
from __future__ import annotations

import torch


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    ema_p = [p for p in ema.parameters()]
    model_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - rate)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


