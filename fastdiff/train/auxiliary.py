"""The one small training loop of the auxiliary networks (the noisy classifier for classifier
guidance, the shapes feature CNN for the FID-like metric): plain cross-entropy minimisation
with a progress bar showing the loss and the running accuracy."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F


def fit_classifier(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int,
                   batch: Callable[[int], Tuple[torch.Tensor, ...]], *,
                   scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None, progress: bool = False,
                   desc: str = "train", report_every: int = 50) -> float:
    """Minimise the cross-entropy of `model(*inputs)` against the labels, where
    `batch(step) -> (*inputs, labels)` draws step's batch (from its own generator: the loop
    draws nothing itself). Leaves the model in eval mode; returns the last loss."""
    it = range(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        it = bar = tqdm(it, desc=desc)
    model.train()
    correct = seen = 0
    loss = torch.zeros(())
    for step in it:
        *inputs, labels = batch(step)
        logits = model(*inputs)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if bar is not None:
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            if step % report_every == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / seen:.2f}")
                correct = seen = 0
    model.eval()
    return float(loss.detach())
