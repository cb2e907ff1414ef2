"""Guidance (thesis §3.3): classifier-free (Ho & Salimans) and classifier (Dhariwal & Nichol).

Both act on the model output before the fused step, except ancestral classifier guidance,
which shifts the step's mean; `fastdiff.sample` wires them in (`y=`, `guidance_scale=`,
`classifier=`, `classifier_scale=`).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch


def as_labels(y: Union[int, torch.Tensor], batch: int, device, num_classes: Optional[int]) -> torch.Tensor:
    """Labels as a LongTensor (batch,), checked against the model's classes."""
    if isinstance(y, bool):
        raise TypeError(f"y must be an int or an integer tensor, got {y!r}")
    if isinstance(y, int):
        y = torch.full((batch,), y, dtype=torch.long, device=device)
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex():
        raise TypeError(f"y must be an int or an integer tensor, got {type(y).__name__}")
    y = y.to(device=device, dtype=torch.long).reshape(-1)
    if y.numel() == 1 and batch != 1:
        y = y.expand(batch)
    if y.shape != (batch,):
        raise ValueError(f"y must hold one label per sample ({batch}), got shape {tuple(y.shape)}")
    if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"y must be labels in [0, {num_classes - 1}], got values in "
                         f"[{y.min().item()}, {y.max().item()}]")
    return y


class ClassifierFreeGuidance:
    """eps~ = (1 + w) eps(x, y) - w eps(x, none), both halves in one batched forward.

    The combination is affine with weights summing to one, so it is the same whether the
    model predicts eps, x0 or v. For a learned variance the mean channels are guided and
    the variance channels of the conditional branch kept.
    """

    def __init__(self, model: Callable, y: torch.Tensor, scale: float, null_label: int, mean_channels: Optional[int]):
        self.model, self.y, self.scale = model, y, float(scale)
        self.null = torch.full_like(y, null_label)
        self.mean_channels = mean_channels  # None: every output channel is a mean channel

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.scale == 0.0:
            return self.model(x, t, y=self.y, **kwargs)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([self.y, self.null]), **kwargs)
        cond, uncond = out.chunk(2)
        c = self.mean_channels or cond.shape[1]
        guided = (1.0 + self.scale) * cond[:, :c] - self.scale * uncond[:, :c]
        return torch.cat([guided, cond[:, c:]], dim=1) if self.mean_channels else guided


def classifier_log_prob_grad(classifier: Callable, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x log p(y | x_t, t) from a classifier returning logits (B, classes)."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, t)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"classifier must return logits of shape ({x.shape[0]}, classes), "
                             f"got {tuple(logits.shape)}")
        log_probs = torch.log_softmax(logits.to(torch.float64 if x.dtype == torch.float64 else torch.float32), -1)
        selected = log_probs.gather(1, y.reshape(-1, 1)).sum()
        (grad,) = torch.autograd.grad(selected, x_in)
    return grad.to(x.dtype)


def null_label_of(model: Callable, null_label: Optional[int]) -> int:
    if null_label is not None:
        return int(null_label)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        raise ValueError("guidance_scale > 0 needs the model's 'no label' index: give null_label=, or use a "
                         "model with `num_classes` (its index num_classes means no label)")
    return int(num_classes)
