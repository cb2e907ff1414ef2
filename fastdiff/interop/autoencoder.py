"""diffusers `AutoencoderKL` folders (config.json + weights) in and out.

fastdiff's AutoencoderKL uses diffusers' config fields and parameter names, so the conversion is
the identity on names; what this module adds is the checks (class name, unknown fields, weights
that do not fit, named in the error) and the one rename diffusers itself applies to old folders
(the mid-level attention's query/key/value/proj_attn, before diffusers 0.14, are to_q/to_k/to_v/to_out.0).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Tuple

import torch

from fastdiff.errors import InputError, UserError
from fastdiff.io import atomic_write_folder
from fastdiff.interop.diffusers import UNET_CONFIG, _load_weights, _read_json
from fastdiff.models.autoencoder import AutoencoderKL, diffusers_folder_files

CLASS_NAME = "AutoencoderKL"
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def is_autoencoder_folder(path) -> bool:
    """A folder whose config.json names diffusers' AutoencoderKL."""
    config = Path(path) / UNET_CONFIG
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == CLASS_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _renamed(key: str) -> str:
    head, _, leaf = key.rpartition(".")  # e.g. encoder.mid_block.attentions.0.query . weight
    module, _, last = head.rpartition(".")
    if ".attentions." in key and last in _OLD_ATTENTION_NAMES:
        return f"{module}.{_OLD_ATTENTION_NAMES[last]}.{leaf}"
    return key


def load_autoencoder(path, device="cpu") -> Tuple[AutoencoderKL, dict]:
    """(autoencoder, info) from a diffusers AutoencoderKL folder; float32 weights, eval mode."""
    path = Path(os.path.expanduser(str(path)))
    where = str(path / UNET_CONFIG)
    config = _read_json(path / UNET_CONFIG)
    if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise InputError(f"{where}: _class_name={config.get('_class_name')!r}: expected {CLASS_NAME!r}")
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        model = AutoencoderKL(**fields)
    except (ValueError, TypeError) as e:
        raise InputError(f"{where}: {e}") from None
    state = {_renamed(k): v.float() if v.is_floating_point() else v for k, v in _load_weights(path).items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(f"{path}: the weights do not fit the config ({e})") from None
    info = {"source": str(path), "format": "diffusers", "step": None, "weights": "diffusers",
            "autoencoder_config": config}
    return model.to(device).eval(), info


def export_autoencoder(model: AutoencoderKL, out, dtype: torch.dtype = torch.float32) -> Path:
    """Write `model` as a diffusers AutoencoderKL folder (config.json + safetensors) that
    `diffusers.AutoencoderKL.from_pretrained` and `fastdiff.load_model` read. `out` must not exist
    or be an empty folder; the folder appears whole or not at all."""
    if not isinstance(model, AutoencoderKL):
        raise TypeError(f"model must be a fastdiff.models.AutoencoderKL, got {type(model).__name__}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder (nothing written)")
    return atomic_write_folder(out, diffusers_folder_files(model, dtype=dtype))
