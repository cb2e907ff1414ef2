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
import inspect
import json
import os
import random
import re
import stat
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from fastdiff.data import StepSampler
from fastdiff.diffusion import GaussianDiffusion
from fastdiff.errors import InputError, UserError
from fastdiff.io import LOCK_NAME, atomic_write_bytes
from fastdiff.models.unet import UNet
from fastdiff.train.config import TrainConfig, build_diffusion, config_from_dict
from fastdiff.train.latent import run_latent_model

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
    try:
        previous = read_checkpoint_record(out, missing_ok=True)
    except InputError:  # a damaged record (--overwrite): nothing of it to keep
        previous = None
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
    """The commit record of a run folder (or its checkpoint.json), checked against the record
    schema (check_record): a tampered or truncated record is one InputError naming the file
    and the key, never a KeyError later or a silent default."""
    path = Path(out)
    if path.is_dir():
        path = path / CHECKPOINT_JSON
    if not path.exists():
        if missing_ok:
            return None
        raise FileNotFoundError(f"{path}: no checkpoint (train first: fastdiff train --out {path.parent})")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, more than a record ever holds ({MAX_RECORD_BYTES})")
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable checkpoint record ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"{path}: not a fastdiff checkpoint (format {record.get('format') if isinstance(record, dict) else None!r})")
    try:
        check_record(record)
    except ValueError as e:
        raise InputError(f"{path}: invalid checkpoint record: {e}") from None
    return record


# --------------------------------------------------------------------------- schemas
MAX_RECORD_BYTES = 64 << 20
_WEIGHTS_NAME = re.compile(r"ckpt-[0-9]{1,12}\.safetensors")
# The U-Net's configuration as saved (model.config): type and bounds of each key. The bounds
# are far above any model this library trains; they stop a tampered file from building a
# network of gigabytes before its tensors are compared with the file's.
_INT, _OPT_INT, _BOOL, _FLOAT, _INTS = "int", "int|None", "bool", "float", "ints"
MODEL_CONFIG_SCHEMA = {
    "image_size": (_INT, 1, 1024), "in_channels": (_INT, 1, 64), "model_channels": (_INT, 1, 2048),
    "channel_mult": (_INTS, 1, 16), "num_res_blocks": (_INT, 0, 16), "attention_resolutions": (_INTS, 1, 1024),
    "dropout": (_FLOAT, 0.0, 1.0), "num_heads": (_INT, 1, 1024), "num_head_channels": (_OPT_INT, 1, 2048),
    "use_scale_shift_norm": (_BOOL, None, None), "num_classes": (_OPT_INT, 1, 100_000),
    "learn_sigma": (_BOOL, None, None), "num_groups": (_INT, 1, 2048), "out_channels": (_INT, 1, 128),
}
MAX_LEVELS = 8


def _check_value(key: str, value, kind: str, lo, hi) -> None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == _BOOL:
        ok = isinstance(value, bool)
    elif kind == _FLOAT:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value < hi
    elif kind == _INTS:
        ok = isinstance(value, (list, tuple)) and len(value) <= 64 and all(is_int(v) and lo <= v <= hi for v in value)
    else:
        ok = (value is None and kind == _OPT_INT) or (is_int(value) and lo <= value <= hi)
    if not ok:
        bounds = "" if lo is None else f" in [{lo}, {hi}]"
        raise ValueError(f"model_config[{key!r}] must be {kind}{bounds}, got {value!r:.60}")


def check_model_config(mc) -> dict:
    """A saved U-Net configuration (UNet.config), checked key by key: ValueError naming the key.
    Keys this version does not know are refused (UNet would not accept them)."""
    if not isinstance(mc, dict):
        raise ValueError(f"model_config must be a JSON object, got {type(mc).__name__}")
    missing = [k for k in MODEL_CONFIG_SCHEMA if k not in mc]
    if missing:
        raise ValueError(f"model_config lacks {', '.join(missing)}")
    params = set(inspect.signature(UNet.__init__).parameters) - {"self", "diffusion"}
    unknown = sorted(k for k in mc if k not in params)
    if unknown:
        raise ValueError(f"model_config has keys no UNet takes: {', '.join(unknown)}")
    for key, (kind, lo, hi) in MODEL_CONFIG_SCHEMA.items():
        _check_value(key, mc[key], kind, lo, hi)
    if not 1 <= len(mc["channel_mult"]) <= MAX_LEVELS:
        raise ValueError(f"model_config['channel_mult'] must have 1 to {MAX_LEVELS} levels, got {mc['channel_mult']!r}")
    return dict(mc)


def _check_type(record: dict, key: str, types, what: str) -> None:
    value = record.get(key)
    if not isinstance(value, types) or isinstance(value, bool):
        raise ValueError(f"{key!r} must be {what}, got {value!r:.60}")


def check_record(record: dict) -> dict:
    """The checkpoint.json schema: each key's type and bounds, the config and model_config
    schemas, and `weights` a plain ckpt-<step>.safetensors file name. ValueError naming the key."""
    _check_type(record, "step", int, "an integer step >= 0")
    if record["step"] < 0:
        raise ValueError(f"'step' must be >= 0, got {record['step']}")
    _check_type(record, "weights", str, "the weights file name")
    if not _WEIGHTS_NAME.fullmatch(record["weights"]):
        raise ValueError(f"'weights' must be a plain file name ckpt-<step>.safetensors inside the run folder, "
                         f"got {record['weights']!r:.80}")
    for key in ("config", "model_config", "optimizer", "rng", "data", "t_sampler"):
        _check_type(record, key, dict, "a JSON object")
    nonfinite = record.get("nonfinite_skipped", 0)
    if not isinstance(nonfinite, int) or isinstance(nonfinite, bool) or nonfinite < 0:
        raise ValueError(f"'nonfinite_skipped' must be an integer >= 0, got {nonfinite!r:.60}")
    try:
        config_from_dict(record["config"], strict=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"'config': {e}") from None
    check_model_config(record["model_config"])
    return record


def weights_path(out: Path, record: dict) -> Path:
    """The weights file a (checked) record names: a regular file in the run folder itself (not
    a link, FIFO or device: reading one could hang or leave the folder)."""
    path = Path(out) / record["weights"]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: the weights file checkpoint.json names is missing") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the weights file ({e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: the weights file checkpoint.json names is not a regular file")
    return path


def check_tensor_shapes(module: torch.nn.Module, shapes: Dict[str, Tuple[int, ...]], source, prefix: str = "",
                        what: str = "weights") -> None:
    """Compare the tensors a file holds (name -> shape, read from its header) with a network
    built on the meta device: any difference is an InputError before anything is allocated."""
    expected = {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:3]) + (f" ... ({len(keys)} in all)" if len(keys) > 3 else "")
        detail = f"; {wrong[0]} is {got[wrong[0]]} in the file, {expected[wrong[0]]} in the network" if wrong else ""
        raise InputError(f"{source}: the {what} do not fit the model its metadata describes: {len(missing)} missing "
                         f"[{show(missing)}], {len(unexpected)} unexpected [{show(unexpected)}], {len(wrong)} of "
                         f"another shape [{show(wrong)}]{detail}")


def file_tensor_shapes(path: Path) -> Tuple[Dict[str, Tuple[int, ...]], dict]:
    """(name -> shape, metadata) from a safetensors file's header, reading no tensor data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, (f.metadata() or {})
    except Exception as e:
        raise InputError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def meta_model(config: TrainConfig, model_config: dict) -> UNet:
    """The U-Net a record describes, built on the meta device (no memory) to check shapes."""
    diffusion = build_diffusion(config)  # float64 tables of T entries (T is bounded by the config schema)
    with torch.device("meta"):
        return UNet(diffusion=diffusion, **model_config)


def load_tensors(out: Path, record: dict) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = weights_path(out, record)
    try:
        return load_file(str(weights))
    except Exception as e:
        raise InputError(f"{weights}: cannot read checkpoint weights ({type(e).__name__}: {e})") from None


def load_checkpoint(out, ema: bool = True, device="cpu") -> Tuple[UNet, dict]:
    """(model, record) from a training folder: the EMA weights unless ema=False. The model
    carries its GaussianDiffusion (model.diffusion) and is in eval mode. A latent run (--autoencoder)
    gives a fastdiff.models.LatentDiffusionModel (the U-Net with the run's autoencoder). The record and the
    weights file's header are checked before the network is built."""
    out = Path(out)
    if out.is_file():
        out = out.parent
    record = read_checkpoint_record(out)
    config = config_from_dict(record["config"], strict=True)
    mc = dict(record["model_config"])
    prefix = "ema." if ema else "model."
    shapes, _ = file_tensor_shapes(weights_path(out, record))
    check_tensor_shapes(meta_model(config, mc), shapes, out / record["weights"], prefix=prefix)
    model = UNet(diffusion=build_diffusion(config), **mc)
    tensors = load_tensors(out, record)
    model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    model.default_guidance_scale = config.resolved_guidance_scale
    model = model.to(device).eval()
    if config.autoencoder is not None:  # a latent run: its U-Net with the run's copy of the autoencoder
        model = run_latent_model(out, model)
    return model, record


# --------------------------------------------------------------------------- the run's own files
RUN_FILES = (CHECKPOINT_JSON, "log.jsonl", "loss.png")


def is_run_file(path) -> bool:
    """Whether `path` is one of the files a training run in its folder owns (its record, its
    weights, its log): writing anything else there would destroy the run's state."""
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    folder = path.parent
    if not (folder / CHECKPOINT_JSON).exists():
        return False
    return path.name in RUN_FILES or path.name.startswith("ckpt-") or path.name == LOCK_NAME


def refuse_run_file(path, flag: str = "--out") -> None:
    """UserError when `path` would overwrite a file of a training run (see is_run_file)."""
    resolved = Path(os.path.realpath(os.path.expanduser(str(path))))
    for p in (Path(os.path.expanduser(str(path))), resolved):
        if is_run_file(p):
            raise UserError(f"{flag} {path}: that is a file of the training run in {p.parent} "
                            f"({p.name}); writing it would destroy the run. Choose another path")
