"""fastdiff's own model files: `export_model` writes a training run's weights as one
self-describing safetensors file, `load_model` reads it (or a run folder) back as a U-Net
that carries its diffusion and default guidance scale. A latent run's file also holds its
autoencoder (tensors under "autoencoder.", config in the metadata) and loads back as a
fastdiff.models.LatentDiffusionModel."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from fastdiff.errors import InputError
from fastdiff.io import atomic_write_bytes, check_output_file
from fastdiff.models.autoencoder import AutoencoderKL
from fastdiff.models.latent import LatentDiffusionModel
from fastdiff.models.unet import UNet
from fastdiff.train.checkpoint import (CHECKPOINT_JSON, check_model_config, check_tensor_shapes, load_checkpoint,
                                       meta_model, refuse_run_file)
from fastdiff.train.config import build_diffusion, config_from_dict

MODEL_FORMAT = "fastdiff-model-1"
_METADATA_KEYS = ("config", "model_config", "step", "weights", "default_guidance_scale")
_EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: a latent model's export: its autoencoder's tensors under this prefix, its config under this metadata key
AUTOENCODER_PREFIX = "autoencoder."
AUTOENCODER_KEY = "autoencoder_config"


def export_model(run, path, ema: bool = True, dtype: str = "fp32") -> Path:
    """Write the weights of a training run (EMA unless ema=False) as one self-describing
    safetensors file: the tensors (stored as `dtype`: "fp32", "fp16" or "bf16"; loaded back
    as fp32) and, in its metadata, the U-Net and diffusion configuration and the default
    guidance scale. `load_model` reads it; a few MB instead of a checkpoint's optimizer state."""
    from safetensors.torch import save as st_save

    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_EXPORT_DTYPES)}, got {dtype!r}")
    refuse_run_file(path, "export path")  # before any work: never over a run's own record or weights
    check_output_file(path, "export path")
    model, record = load_checkpoint(run, ema=ema)
    latent = isinstance(model, LatentDiffusionModel)
    networks = {"": model.unet, AUTOENCODER_PREFIX: model.autoencoder} if latent else {"": model}
    tensors = {prefix + k: (v.to(_EXPORT_DTYPES[dtype]) if v.is_floating_point() else v).contiguous()
               for prefix, net in networks.items() for k, v in net.state_dict().items()}
    config = config_from_dict(record["config"])
    metadata = {"format": MODEL_FORMAT, "model_config": json.dumps(record["model_config"]),
                "config": json.dumps(dataclasses.asdict(config)), "step": str(record["step"]),
                "weights": "ema" if ema else "model", "stored_dtype": dtype,
                "default_guidance_scale": repr(config.resolved_guidance_scale)}
    if latent:  # the run's autoencoder travels in the same file: the export stands alone
        ae = model.autoencoder
        metadata[AUTOENCODER_KEY] = json.dumps({**{k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in ae.config.items()}, "scaling_factor": ae.scaling_factor})
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))
    return path


def load_model(path, device="cpu") -> Tuple[UNet, dict]:
    """(model, info) from a file written by `export_model` or from a training folder (its
    EMA weights); the model carries its GaussianDiffusion and default guidance scale and is
    in eval mode. info: the training config, step and where the weights came from."""
    from safetensors import safe_open

    path = Path(os.path.expanduser(str(path)))
    if path.is_dir() or path.name == CHECKPOINT_JSON:
        model, record = load_checkpoint(path, device=device)
        return model, {"config": record["config"], "step": record["step"], "weights": "ema", "source": str(path)}
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file or training folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise InputError(f"{path}: not a safetensors model file ({type(e).__name__}: {e})") from None
    config, model_config, guidance, step = _check_metadata(path, metadata)
    ae_config = _autoencoder_metadata(path, metadata, config)  # None for a pixel model
    if ae_config is not None:
        with torch.device("meta"):
            check_tensor_shapes(_autoencoder(path, ae_config), shapes, path, prefix=AUTOENCODER_PREFIX,
                                what="autoencoder weights")
        shapes = {k: v for k, v in shapes.items() if not k.startswith(AUTOENCODER_PREFIX)}
    check_tensor_shapes(meta_model(config, model_config), shapes, path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise InputError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from None
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    model = UNet(diffusion=build_diffusion(config), **model_config)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(AUTOENCODER_PREFIX)})
    model.default_guidance_scale = guidance
    if ae_config is not None:  # a latent model: the U-Net with the autoencoder stored beside it
        ae = _autoencoder(path, ae_config)
        n = len(AUTOENCODER_PREFIX)
        ae.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith(AUTOENCODER_PREFIX)})
        try:
            model = LatentDiffusionModel(model, ae)
        except ValueError as e:
            raise InputError(f"{path}: {e}") from None
    info = {"config": dataclasses.asdict(config), "step": step, "weights": metadata["weights"],
            "source": str(path)}
    return model.to(device).eval(), info


def _check_metadata(path: Path, metadata: dict):
    """(config, model_config, default guidance scale, step) from an export's metadata, each
    checked against the record schemas (fastdiff.train.checkpoint): one InputError naming the
    key, never a KeyError or a silent default."""
    def bad(msg):
        return InputError(f"{path}: invalid fastdiff model metadata: {msg}")
    if metadata.get("format") != MODEL_FORMAT:
        raise InputError(f"{path}: not a fastdiff model file (format {metadata.get('format')!r}; "
                         f"write one with `fastdiff export`)")
    missing = [k for k in _METADATA_KEYS if k not in metadata]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    try:
        config = config_from_dict(json.loads(metadata["config"]), strict=True)
    except (TypeError, ValueError) as e:
        raise bad(f"'config': {e}") from None
    try:
        model_config = check_model_config(json.loads(metadata["model_config"]))
    except (TypeError, ValueError) as e:
        raise bad(f"{e}") from None
    try:
        guidance = float(metadata["default_guidance_scale"])
        step = int(metadata["step"])
    except ValueError:
        raise bad(f"'default_guidance_scale' and 'step' must be numbers, got {metadata['default_guidance_scale']!r:.40} "
                  f"and {metadata['step']!r:.40}") from None
    if not (math.isfinite(guidance) and guidance >= 0):
        raise bad(f"'default_guidance_scale' must be a finite number >= 0, got {guidance!r}")
    if step < 0:
        raise bad(f"'step' must be >= 0, got {step}")
    if metadata["weights"] not in ("ema", "model"):
        raise bad(f"'weights' must be 'ema' or 'model', got {metadata['weights']!r:.40}")
    return config, model_config, guidance, step


def _autoencoder_metadata(path: Path, metadata: dict, config) -> Optional[dict]:
    """The autoencoder config a latent model's export carries (None for a pixel model), checked
    against the training config: a latent run's file without it, or the reverse, is refused."""
    text = metadata.get(AUTOENCODER_KEY)
    if (text is None) != (config.autoencoder is None):
        what = (f"lacks {AUTOENCODER_KEY!r}: its training config is a latent run's" if text is None else
                f"has {AUTOENCODER_KEY!r}, but its training config is a pixel run's")
        raise InputError(f"{path}: invalid fastdiff model metadata: the file {what}")
    if text is None:
        return None
    try:
        ae_config = json.loads(text)
    except ValueError as e:
        raise InputError(f"{path}: invalid fastdiff model metadata: {AUTOENCODER_KEY!r} is not JSON ({e})") from None
    if not isinstance(ae_config, dict):
        raise InputError(f"{path}: invalid fastdiff model metadata: {AUTOENCODER_KEY!r} must be a JSON object")
    return ae_config


def _autoencoder(path: Path, ae_config: dict) -> AutoencoderKL:
    try:
        return AutoencoderKL(**ae_config)
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: invalid fastdiff model metadata: {AUTOENCODER_KEY!r}: {e}") from None
