"""Training the noisy classifier for classifier guidance (`fastdiff train-classifier`).

The classifier learns p(y | x_t, t) on x_t = q_sample(x_0, t) with t uniform, by cross-
entropy (Dhariwal & Nichol 2021). It is saved as safetensors weights plus a JSON record
(config, schedule, step, accuracy), each written atomically.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from fastdiff.data import load_dataset
from fastdiff.diffusion import GaussianDiffusion
from fastdiff.models.classifier import CLASSIFIER_PRESETS, NoisyClassifier
from fastdiff.schedule import NoiseSchedule
from fastdiff.io import atomic_write_bytes
from fastdiff.options import nonneg_float, option, positive_float, positive_int
from fastdiff.train.auxiliary import fit_classifier
from fastdiff.train.config import SCHEDULES

WEIGHTS = "classifier.safetensors"
RECORD = "classifier.json"


@dataclasses.dataclass
class ClassifierConfig:
    """A classifier run; each field is also a `fastdiff train-classifier` option."""
    data: str = option("shapes", "labelled dataset, as for train")
    out: str = option("runs/classifier", "output folder", required=True)
    steps: int = option(2000, "training steps", type=positive_int)
    preset: str = option("small", "classifier preset", choices=tuple(CLASSIFIER_PRESETS))
    batch_size: int = option(64, "batch size", type=positive_int)
    lr: float = option(3e-4, "learning rate", type=positive_float)
    weight_decay: float = option(0.05, "AdamW weight decay", type=nonneg_float)
    seed: int = option(0, "seed")
    schedule: str = option("linear", "noise schedule: must match the diffusion model it will guide",
                           choices=SCHEDULES)
    T: int = option(1000, "diffusion steps: must match the diffusion model", type=positive_int)
    image_size: int = option(32, "image resolution", type=positive_int)
    progress: bool = option(True, "no progress bar", flag="--no-progress")

    def validate(self) -> "ClassifierConfig":
        if self.preset not in CLASSIFIER_PRESETS:
            raise ValueError(f"preset must be one of {tuple(CLASSIFIER_PRESETS)}, got {self.preset!r}")
        for name in ("steps", "batch_size", "T"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        NoiseSchedule.named(self.schedule, self.T)  # validates the name
        return self


def train_classifier(config: ClassifierConfig) -> Path:
    """Train and save; returns the output folder."""
    config.validate()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    dataset = load_dataset(config.data, image_size=config.image_size, seed=config.seed)
    if dataset.num_classes is None:
        raise ValueError(f"{config.data}: the data set has no labels; a classifier needs them")
    diffusion = GaussianDiffusion(NoiseSchedule.named(config.schedule, config.T))
    model = NoisyClassifier.preset(config.preset, dataset.num_classes, image_size=dataset.shape[1],
                                   in_channels=dataset.shape[0])
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    def batch(step):
        x0, y = dataset.batch(torch.randint(0, len(dataset), (config.batch_size,), generator=gen))
        t = torch.randint(0, config.T, (config.batch_size,), generator=gen)
        return diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gen)), t, y

    fit_classifier(model, opt, config.steps, batch, progress=config.progress, desc="classifier")
    atomic_write_bytes(out / WEIGHTS, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    record = {"config": dataclasses.asdict(config), "model": model.config, "steps": config.steps,
              "class_names": dataset.class_names}
    atomic_write_bytes(out / RECORD, json.dumps(record, indent=2).encode())
    return out


def load_classifier(path, device="cpu") -> NoisyClassifier:
    """A trained classifier from its folder (eval mode)."""
    path = Path(path)
    record_file = path / RECORD if path.is_dir() else path
    if not record_file.exists():
        raise FileNotFoundError(f"{record_file}: no classifier record (train one with `fastdiff train-classifier`)")
    try:
        record = json.loads(record_file.read_text())
        model = NoisyClassifier(**record["model"])
        model.load_state_dict(load_file(str(record_file.parent / WEIGHTS)))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{record_file.parent}: unreadable classifier ({e})") from e
    return model.to(device).eval()
