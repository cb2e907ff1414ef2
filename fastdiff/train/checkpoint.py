"""Checkpoints of a training run, written so that no kill loses work.

Layout in the run folder: `checkpoint.json` (the commit record: config, step, RNG states,
data position, t-sampler state, and the name of the weights file) and
`ckpt-<step>.safetensors` (model, EMA, optimizer tensors). Each file is written atomically
(fastdiff.io.atomic_write_bytes), weights first and the JSON last, and the weights file a
JSON names is deleted only once a newer JSON is committed: a kill at any moment leaves the
last good checkpoint readable, and resuming from it continues bit for bit (on the CPU, N
steps in one run equal N/2 + resume + N/2).
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from fastdiff.data import StepSampler
from fastdiff.diffusion import GaussianDiffusion
from fastdiff.errors import InputError
from fastdiff.io import atomic_write_bytes
from fastdiff.models.unet import UNet
from fastdiff.train.config import TrainConfig, build_diffusion, config_from_dict

CHECKPOINT_JSON = "checkpoint.json"
FORMAT = "fastdiff-checkpoint-1"


def flatten_optimizer(opt: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    state: Dict[int, Dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def state_tensors(prefix: str, module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(out: Path, step: int, config: TrainConfig, model: UNet, ema: UNet,
                    opt: torch.optim.Optimizer, diffusion: GaussianDiffusion, sampler: StepSampler,
                    nonfinite: int, extra: Optional[dict] = None) -> Path:
    from safetensors.torch import save as st_save

    out.mkdir(parents=True, exist_ok=True)
    tensors = {**state_tensors("model", model), **state_tensors("ema", ema)}
    opt_tensors, opt_meta = flatten_optimizer(opt)
    tensors.update(opt_tensors)
    weights_name = f"ckpt-{step:08d}.safetensors"
    atomic_write_bytes(out / weights_name, st_save(tensors, metadata={"format": FORMAT, "step": str(step)}),
                       tag=str(step))
    ts_state = {k: v.tolist() for k, v in diffusion.t_sampler.state_dict().items()}
    record = {
        "format": FORMAT,
        "step": step,
        "weights": weights_name,
        "config": dataclasses.asdict(config),
        "model_config": model.config,
        "optimizer": opt_meta,
        "rng": rng_state(),
        "data": {"sampler": "StepSampler", "seed": sampler.seed, "batch_size": sampler.batch_size,
                 "world": sampler.world, "position": sampler.position(step), "dataset_size": sampler.n},
        "t_sampler": {"name": diffusion.t_sampler_name, "state": ts_state},
        "nonfinite_skipped": nonfinite,
        "saved_at": time.time(),
        **(extra or {}),
    }
    previous = read_checkpoint_record(out, missing_ok=True)
    atomic_write_bytes(out / CHECKPOINT_JSON, json.dumps(record, indent=1).encode(), tag=str(step))
    # The new record is committed: weights no record names can go (keep the last few).
    keep = {weights_name} | ({previous["weights"]} if previous else set())
    olds = sorted(out.glob("ckpt-*.safetensors"))
    for f in olds[:-config.keep_checkpoints]:
        if f.name not in keep:
            try:
                f.unlink()
            except OSError:
                pass
    return out / CHECKPOINT_JSON


def read_checkpoint_record(out, missing_ok: bool = False) -> Optional[dict]:
    path = Path(out)
    if path.is_dir():
        path = path / CHECKPOINT_JSON
    if not path.exists():
        if missing_ok:
            return None
        raise FileNotFoundError(f"{path}: no checkpoint (train first: fastdiff train --out {path.parent})")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable checkpoint record ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"{path}: not a fastdiff checkpoint (format {record.get('format') if isinstance(record, dict) else None!r})")
    return record


def load_tensors(out: Path, record: dict) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = out / record["weights"]
    try:
        return load_file(str(weights))
    except Exception as e:
        raise InputError(f"{weights}: cannot read checkpoint weights ({type(e).__name__}: {e})") from None


def load_checkpoint(out, ema: bool = True, device="cpu") -> Tuple[UNet, dict]:
    """(model, record) from a training folder: the EMA weights unless ema=False. The model
    carries its GaussianDiffusion (model.diffusion) and is in eval mode."""
    out = Path(out)
    if out.is_file():
        out = out.parent
    record = read_checkpoint_record(out)
    config = config_from_dict(record["config"])
    mc = dict(record["model_config"])
    model = UNet(diffusion=build_diffusion(config), **mc)
    tensors = load_tensors(out, record)
    prefix = "ema." if ema else "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    model.default_guidance_scale = config.resolved_guidance_scale
    return model.to(device).eval(), record


