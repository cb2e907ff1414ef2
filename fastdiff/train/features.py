"""Training the shapes feature CNN of the FID-like metric (`fastdiff train-features`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fastdiff.data import load_dataset
from fastdiff.io import atomic_write_bytes
from fastdiff.metrics.features import SHAPES_RECORD, SHAPES_WEIGHTS, ShapesCNN
from fastdiff.train.auxiliary import fit_classifier


def train_shapes_features(out_dir, steps: int = 400, seed: int = 0, batch_size: int = 64, lr: float = 3e-3,
                          dataset_size: int = 4000, width: int = 16, image_size: int = 32,
                          progress: bool = False) -> Path:
    """Train the shapes feature CNN (cross-entropy on the labels) and save it to `out_dir` as
    safetensors + JSON (each written atomically). Deterministic by seed on a given machine
    and thread count. Returns the folder."""
    from safetensors.torch import save

    for name, v in (("steps", steps), ("batch_size", batch_size), ("dataset_size", dataset_size), ("width", width)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if image_size < 12:
        raise ValueError(f"image_size must be >= 12 (the shapes generator's smallest size), got {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = load_dataset("shapes", n=dataset_size, seed=seed, train=True, image_size=image_size)
    held_out = load_dataset("shapes", n=min(1000, dataset_size), seed=seed, train=False, image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapesCNN(num_classes=train.num_classes, width=width, image_size=train.shape[-1])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)

    def batch(step):
        x, y = train.batch(torch.randint(0, len(train), (batch_size,), generator=gen))
        if torch.rand((), generator=gen) < 0.5:  # horizontal flip: every class is symmetric enough
            x = x.flip(-1)
        return x, y

    fit_classifier(model, opt, steps, batch, scheduler=sched, progress=progress, desc="shapes features")
    correct = 0
    with torch.no_grad():
        for s in range(0, len(held_out), 256):
            x, y = held_out.batch(range(s, min(len(held_out), s + 256)))
            correct += int((model(x).argmax(1) == y).sum())
    accuracy = correct / len(held_out)
    atomic_write_bytes(out / SHAPES_WEIGHTS, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    record = {"format": "fastdiff.ShapesFeatures/1", "model": model.config, "feature_dim": model.feature_dim,
              "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "dataset_size": dataset_size,
              "held_out_accuracy": accuracy, "held_out_n": len(held_out), "class_names": list(train.class_names)}
    atomic_write_bytes(out / SHAPES_RECORD, json.dumps(record, indent=2).encode())
    return out
