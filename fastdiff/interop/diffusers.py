"""diffusers folders in and out: a `UNet2DModel` folder (config.json + weights) or a pixel-space
pipeline folder (model_index.json, unet/, scheduler/) becomes a fastdiff `UNet` carrying the
scheduler as its `GaussianDiffusion`, default spacing and default clipping; a fastdiff model
becomes a pipeline folder diffusers loads. diffusers itself is not needed for either.

The conversion follows diffusers' own conversion scripts: the config is translated field by
field (a field or value fastdiff cannot compute is an error naming it, never a model that
computes something else), the weights by a table of renames plus one explicit reshape (the
attention's q, k, v projections are one fused `qkv` here), checked by load_state_dict(strict=True).

Supported UNet2DModel fields: sample_size (an int or a square pair), in_channels, out_channels (=
in_channels, or twice for a learned variance), center_input_sample, time_embedding_type "positional",
time_embedding_dim (None or 4 x block_out_channels[0]), flip_sin_to_cos, freq_shift, down_block_types
(DownBlock2D / AttnDownBlock2D) and up_block_types (their mirror), mid_block_type "UNetMidBlock2D",
block_out_channels, layers_per_block, mid_block_scale_factor 1, downsample_padding 0 or 1,
downsample_type / upsample_type "conv", dropout, act_fn "silu", attention_head_dim (None or a divisor of
every attention width), norm_num_groups, attn_norm_num_groups (None or norm_num_groups), norm_eps,
resnet_time_scale_shift "default" or "scale_shift", add_attention, num_class_embeds (class_embed_type
None). Anything else (another model class, an unknown field, fourier or learned time embeddings, skip or
resnet up/down blocks, asymmetric attention, "timestep"/"identity" class embeddings, "ada_group"/"spatial"
norms) is refused by name.
Scheduler fields (DDPMScheduler, DDIMScheduler; other classes give their common fields and list the rest
in info["scheduler_fields_not_used"]): num_train_timesteps, beta_schedule linear (as written, no 1000/T
rescaling) / scaled_linear / squaredcos_cap_v2, beta_start, beta_end, trained_betas, prediction_type
epsilon / v_prediction / sample, variance_type fixed_small(_log) / fixed_large / learned_range, clip_sample
(clip_sample_range 1), timestep_spacing leading / trailing / linspace, steps_offset, set_alpha_to_one.
Refused: thresholding=True (dynamic thresholding is not implemented), variance_type learned and
fixed_large_log (diffusers reads those channels as a variance / takes the root of a log), another
clip_sample_range with clipping, rescale_betas_zero_snr, other beta schedules and spacings.

Known difference: diffusers' DDIMScheduler with clip_sample=True moves x_t with the model's
*unclipped* eps unless DDIMPipeline(use_clipped_model_output=True) is asked for; fastdiff (like the
DDIM paper and improved-diffusion) recomputes eps from the clipped x_0. The two agree whenever
nothing is clipped (clip_sample=False, or a model whose x_0 stays in range).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from fastdiff.diffusion import GaussianDiffusion
from fastdiff.errors import InputError, UserError
from fastdiff.io import atomic_write_folder
from fastdiff.models.unet import UNet
from fastdiff.schedule import NoiseSchedule

UNET_CONFIG = "config.json"
PIPELINE_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
WEIGHTS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"
#: fastdiff's own facts that diffusers has no field for (null label row, guidance scale, loss),
#: kept in the exported config.json under a key diffusers ignores (it skips names starting with "_").
FASTDIFF_KEY = "_fastdiff"
DIFFUSERS_VERSION = "0.30.0"  # the format written; any later diffusers reads it

# UNet2DModel's constructor defaults: a field absent from config.json means this value.
UNET_DEFAULTS: Dict[str, object] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D", up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None)
#: Fields accepted only with the one value fastdiff computes (anything else: a clear error).
UNET_FIXED_VALUES: Dict[str, tuple] = dict(
    time_embedding_type=("positional",), mid_block_type=("UNetMidBlock2D",), downsample_type=("conv",),
    upsample_type=("conv",), act_fn=("silu", "swish"), mid_block_scale_factor=(1, 1.0), class_embed_type=(None,),
    num_train_timesteps=(None,))

# The scheduler fields each class has, with diffusers' defaults (the common part of DDPM/DDIM).
_SCHEDULER_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                         trained_betas=None, prediction_type="epsilon", timestep_spacing="leading", steps_offset=0,
                         thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                         rescale_betas_zero_snr=False)
SCHEDULER_DEFAULTS: Dict[str, Dict[str, object]] = {
    "DDPMScheduler": dict(_SCHEDULER_COMMON, variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0),
    "DDIMScheduler": dict(_SCHEDULER_COMMON, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True),
}
_VARIANCES = {None: "fixed_small", "fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
              "fixed_large": "fixed_large", "learned_range": "learned_range"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_SPACINGS = {"leading": "leading", "trailing": "trailing", "linspace": "uniform"}


def _refuse(field: str, value, expected: str, where: str) -> InputError:
    return InputError(f"{where}: {field}={value!r} is not supported by fastdiff (supported: {expected})")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing (a diffusers folder needs it)") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def is_diffusers_folder(path) -> bool:
    """A diffusers U-Net folder (config.json) or pipeline folder (model_index.json)."""
    path = Path(path)
    return path.is_dir() and ((path / PIPELINE_INDEX).is_file() or (path / UNET_CONFIG).is_file())


# --------------------------------------------------------------------------- U-Net config
def _attention_levels(config: dict, where: str) -> List[bool]:
    """Which levels carry attention, from the down and up block types (which must mirror)."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    kinds = {"DownBlock2D": False, "AttnDownBlock2D": True}
    for name, value in (("down_block_types", down), ("up_block_types", up)):
        known = kinds if name == "down_block_types" else {"UpBlock2D": False, "AttnUpBlock2D": True}
        for block in value:
            if block not in known:
                raise _refuse(name, block, f"a list of {' / '.join(known)}", where)
    if len(down) != len(config["block_out_channels"]) or len(up) != len(down):
        raise InputError(f"{where}: down_block_types ({len(down)}), up_block_types ({len(up)}) and "
                         f"block_out_channels ({len(config['block_out_channels'])}) must have one entry per level")
    attn = [kinds[b] for b in down]
    up_attn = [b == "AttnUpBlock2D" for b in reversed(up)]
    if attn != up_attn:
        raise _refuse("up_block_types", up, f"the mirror of down_block_types {down} (attention at the same "
                      "levels in the encoder and the decoder)", where)
    return attn


def unet_kwargs_from_config(config: dict, where: str = "config.json") -> dict:
    """fastdiff.UNet keyword arguments that compute what UNet2DModel(**config) computes."""
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise InputError(f"{where}: _class_name={name!r}: fastdiff imports diffusers' UNet2DModel "
                         "(pixel-space, unconditional or class-conditional) only")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in UNET_DEFAULTS)
    if unknown:
        raise InputError(f"{where}: unknown UNet2DModel config field(s) {unknown}: fastdiff cannot tell "
                         "what they change")
    c = {**UNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for field, allowed in UNET_FIXED_VALUES.items():
        if c[field] not in allowed:
            raise _refuse(field, c[field], " or ".join(repr(a) for a in allowed), where)
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse("sample_size", size, "one int or a square [H, H]", where)
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise _refuse("sample_size", c["sample_size"], "a positive int (the image size)", where)
    widths = [int(w) for w in c["block_out_channels"]]
    groups = int(c["norm_num_groups"]) if c["norm_num_groups"] is not None else None
    if groups is None:
        raise _refuse("norm_num_groups", None, "an int", where)
    if c["time_embedding_dim"] not in (None, 4 * widths[0]):
        raise _refuse("time_embedding_dim", c["time_embedding_dim"], f"None or 4 * block_out_channels[0] = "
                      f"{4 * widths[0]}", where)
    shift = c["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        raise _refuse("resnet_time_scale_shift", shift, "'default' or 'scale_shift'", where)
    attn_groups = c["attn_norm_num_groups"]
    if attn_groups not in (None, groups):
        raise _refuse("attn_norm_num_groups", attn_groups, f"None or norm_num_groups={groups}", where)
    if c["downsample_padding"] not in (0, 1):
        raise _refuse("downsample_padding", c["downsample_padding"], "0 or 1", where)
    attn = _attention_levels(c, where)
    head_dim = c["attention_head_dim"]
    attn_widths = [w for w, a in zip(widths, attn) if a] + ([widths[-1]] if c["add_attention"] else [])
    if head_dim is not None:
        for w in attn_widths:
            if w % int(head_dim):
                raise _refuse("attention_head_dim", head_dim, f"a divisor of every attention width (got width {w})",
                              where)
    in_ch, out_ch = int(c["in_channels"]), int(c["out_channels"])
    if out_ch not in (in_ch, 2 * in_ch):
        raise _refuse("out_channels", out_ch, f"in_channels={in_ch}, or {2 * in_ch} for a learned variance", where)
    num_classes = c["num_class_embeds"]
    kwargs = dict(image_size=size, in_channels=in_ch, channels=widths, num_res_blocks=int(c["layers_per_block"]),
                  attention_resolutions=tuple(size // 2 ** i for i, a in enumerate(attn) if a),
                  dropout=float(c["dropout"]), num_heads=1,
                  num_head_channels=int(head_dim) if head_dim is not None else None,
                  use_scale_shift_norm=shift == "scale_shift", num_classes=num_classes, num_groups=groups,
                  out_channels=out_ch, norm_eps=float(c["norm_eps"]), flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
                  freq_shift=float(c["freq_shift"]), downsample_padding=int(c["downsample_padding"]),
                  center_input_sample=bool(c["center_input_sample"]), null_label=num_classes is None,
                  mid_attention=bool(c["add_attention"]),
                  # diffusers drops the middle attention's GroupNorm for scale-shift models
                  mid_attention_norm=shift == "default" or attn_groups is not None)
    ours = config.get(FASTDIFF_KEY) or {}
    if num_classes is not None and ours.get("null_label"):
        kwargs.update(num_classes=int(num_classes) - 1, null_label=True)  # the last row is "no label"
    return kwargs


def config_from_unet(model: UNet) -> dict:
    """The UNet2DModel config of a fastdiff UNet, or an error naming what diffusers cannot express."""
    c = model.config
    widths = list(c.get("channels") or [c["model_channels"] * m for m in c["channel_mult"]])
    size = c["image_size"]
    attn = [size // 2 ** i in c["attention_resolutions"] for i in range(len(widths))]
    attn_widths = [w for w, a in zip(widths, attn) if a] + ([widths[-1]] if c.get("mid_attention", True) else [])
    if c["num_head_channels"] is not None:
        head_dim = c["num_head_channels"]
    elif c["num_heads"] == 1:
        head_dim = None  # diffusers: one head as wide as the block
    elif len(set(attn_widths)) == 1 and attn_widths[0] % c["num_heads"] == 0:
        head_dim = attn_widths[0] // c["num_heads"]
    else:
        raise UserError(f"num_heads={c['num_heads']} with attention widths {attn_widths}: diffusers sets one "
                        "attention_head_dim for every level, which cannot express a fixed head count over "
                        "different widths")
    scale_shift = bool(c["use_scale_shift_norm"])
    if not scale_shift and not c.get("mid_attention_norm", True):
        raise UserError("mid_attention_norm=False without use_scale_shift_norm: diffusers cannot express it")
    out = dict(_class_name="UNet2DModel", _diffusers_version=DIFFUSERS_VERSION, sample_size=size,
               in_channels=c["in_channels"], out_channels=model.out_channels,
               center_input_sample=bool(c.get("center_input_sample", False)), time_embedding_type="positional",
               flip_sin_to_cos=bool(c.get("flip_sin_to_cos", False)), freq_shift=_json_number(c.get("freq_shift", 0.0)),
               down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
               mid_block_type="UNetMidBlock2D",
               up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
               block_out_channels=widths, layers_per_block=c["num_res_blocks"], mid_block_scale_factor=1,
               downsample_padding=c.get("downsample_padding", 1), downsample_type="conv", upsample_type="conv",
               dropout=float(c["dropout"]), act_fn="silu", attention_head_dim=head_dim,
               norm_num_groups=c["num_groups"],
               attn_norm_num_groups=c["num_groups"] if scale_shift and c.get("mid_attention_norm", True) else None,
               norm_eps=float(c.get("norm_eps", 1e-5)),
               resnet_time_scale_shift="scale_shift" if scale_shift else "default",
               add_attention=bool(c.get("mid_attention", True)), class_embed_type=None, num_class_embeds=None)
    ours = {"default_guidance_scale": float(model.default_guidance_scale), "loss": model.diffusion.loss}
    if c["num_classes"] is not None:
        out["num_class_embeds"] = c["num_classes"] + int(model.null_label)
        ours["null_label"] = bool(model.null_label)
    out[FASTDIFF_KEY] = ours
    return out


def _json_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


# --------------------------------------------------------------------------- weights
_RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
              "skip": "conv_shortcut"}
_ATTN_NAMES = {"norm": "group_norm", "proj_out": "to_out.0"}
_QKV = ("to_q", "to_k", "to_v")
#: Attention parameter names of diffusers checkpoints written before 0.14 (AttentionBlock).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _module_table(model: UNet) -> Dict[str, str]:
    """fastdiff module prefix -> diffusers module prefix, walking the U-Net in diffusers' order."""
    widths = model.config.get("channels") or [model.config["model_channels"] * m for m in model.config["channel_mult"]]
    levels, blocks = len(widths), model.config["num_res_blocks"]
    table = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_embed": "class_embedding", "conv_in": "conv_in", "norm_out": "conv_norm_out",
             "conv_out": "conv_out", "mid.res": "mid_block.resnets.0", "mid.attn": "mid_block.attentions.0",
             "mid2": "mid_block.resnets.1"}
    # fastdiff numbers each side's blocks in one run; diffusers per level (up_blocks[0] is the deepest)
    for side, per_level, resampler in (("down", blocks, "downsamplers"), ("up", blocks + 1, "upsamplers")):
        k = 0
        for i in range(levels):
            for j in range(per_level):
                table[f"{side}.{k}.res"] = f"{side}_blocks.{i}.resnets.{j}"
                table[f"{side}.{k}.attn"] = f"{side}_blocks.{i}.attentions.{j}"
                k += 1
            if i != levels - 1:
                table[f"{side}.{k}.conv"] = f"{side}_blocks.{i}.{resampler}.0.conv"
                k += 1
    return table


def _diffusers_names(key: str, table: Dict[str, str]) -> List[str]:
    """The diffusers parameter name(s) of one fastdiff parameter (three for the fused qkv)."""
    module, param = key.rsplit(".", 1)
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        prefix, rest = ".".join(parts[:cut]), parts[cut:]
        if prefix in table:
            break
    else:
        raise KeyError(key)
    target = table[prefix]
    if not rest:
        return [f"{target}.{param}"]
    (child,) = rest
    if prefix.endswith(".res") or prefix in ("mid2",):
        return [f"{target}.{_RES_NAMES[child]}.{param}"]
    if child == "qkv":
        return [f"{target}.{q}.{param}" for q in _QKV]
    return [f"{target}.{_ATTN_NAMES[child]}.{param}"]


def state_dict_from_diffusers(tensors: Dict[str, torch.Tensor], model: UNet, where: str) -> Dict[str, torch.Tensor]:
    """A UNet2DModel state dict renamed (and q, k, v fused) for `model`; an unknown or missing key
    is an error naming it."""
    renamed = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-2] in _LEGACY_ATTENTION:
            key = ".".join(parts[:-2] + [_LEGACY_ATTENTION[parts[-2]], parts[-1]])
        renamed[key] = value
    table = _module_table(model)
    out, used = {}, set()
    for key in model.state_dict():
        names = _diffusers_names(key, table)
        missing = [n for n in names if n not in renamed]
        if missing:
            raise InputError(f"{where}: missing weight(s) {missing} that the config implies")
        parts = [renamed[n] for n in names]
        out[key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        used.update(names)
    unknown = sorted(set(renamed) - used)
    if unknown:
        raise InputError(f"{where}: unknown weight(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
                         "that the config does not explain")
    return out


def state_dict_to_diffusers(model: UNet) -> Dict[str, torch.Tensor]:
    """The UNet2DModel state dict of a fastdiff UNet (qkv split into to_q, to_k, to_v)."""
    table = _module_table(model)
    out = {}
    for key, value in model.state_dict().items():
        names = _diffusers_names(key, table)
        chunks = [value] if len(names) == 1 else value.chunk(len(names), dim=0)
        for name, chunk in zip(names, chunks):
            out[name] = chunk.detach().cpu().contiguous().clone()
    return out


def _load_weights(folder: Path) -> Dict[str, torch.Tensor]:
    st, binary = folder / WEIGHTS_SAFETENSORS, folder / WEIGHTS_BIN
    if st.is_file():
        from safetensors import safe_open
        try:
            with safe_open(str(st), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise InputError(f"{st}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if binary.is_file():
        try:
            tensors = torch.load(str(binary), map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"{binary}: not a readable weights-only torch file ({type(e).__name__}: {e})") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise InputError(f"{binary}: expected a state dict of tensors")
        return tensors
    raise InputError(f"{folder}: no weights ({WEIGHTS_SAFETENSORS} or {WEIGHTS_BIN}; sharded or variant "
                     "files are not read)")


# --------------------------------------------------------------------------- scheduler
class DiffusersSpacing:
    """A diffusers scheduler's inference timesteps as a fastdiff default spacing:
    steps -> ascending original timesteps ("leading" + steps_offset, "trailing", "linspace")."""

    def __init__(self, timestep_spacing: str, num_train_timesteps: int, steps_offset: int = 0):
        self.timestep_spacing, self.T, self.steps_offset = timestep_spacing, num_train_timesteps, steps_offset

    def __call__(self, steps: int) -> List[int]:
        T = self.T
        if self.timestep_spacing == "leading":
            ts = np.arange(steps) * (T // steps) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
        else:
            ts = np.linspace(0, T - 1, steps).round()
        return sorted(int(t) for t in ts)

    def __repr__(self) -> str:
        return f"DiffusersSpacing({self.timestep_spacing!r}, T={self.T}, steps_offset={self.steps_offset})"


def _betas(c: dict, where: str) -> NoiseSchedule:
    T = int(c["num_train_timesteps"])
    if c["trained_betas"] is not None:
        betas = np.asarray(c["trained_betas"], dtype=np.float64)
        if betas.shape != (T,):
            raise InputError(f"{where}: trained_betas has {betas.size} values, num_train_timesteps={T}")
        return NoiseSchedule.from_betas(betas)
    schedule = c["beta_schedule"]
    if schedule == "linear":  # as written: no 1000 / T rescaling
        return NoiseSchedule.from_betas(np.linspace(c["beta_start"], c["beta_end"], T, dtype=np.float64))
    if schedule == "scaled_linear":
        return NoiseSchedule.from_betas(np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, T,
                                                    dtype=np.float64) ** 2)
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine, s = 0.008, beta <= 0.999
        return NoiseSchedule.cosine(T)
    raise _refuse("beta_schedule", schedule, "'linear', 'scaled_linear', 'squaredcos_cap_v2' or trained_betas", where)


def diffusion_from_scheduler(config: dict, learned_output: bool, where: str = SCHEDULER_CONFIG):
    """(GaussianDiffusion, default spacing, clip_denoised, fields not used) of a scheduler config.

    DDPMScheduler and DDIMScheduler are read completely; another scheduler class gives its noise
    schedule and prediction (its own sampling algorithm's fields are listed as not used)."""
    name = config.get("_class_name", "DDPMScheduler")
    defaults = SCHEDULER_DEFAULTS.get(name, {**_SCHEDULER_COMMON, "clip_sample": False, "clip_sample_range": 1.0})
    c = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    not_used = sorted(k for k in config if not k.startswith("_") and k not in defaults and k != "variance_type")
    if c["prediction_type"] not in _PREDICTIONS:
        raise _refuse("prediction_type", c["prediction_type"], "'epsilon', 'v_prediction' or 'sample'", where)
    variance_type = c.get("variance_type")
    if variance_type not in _VARIANCES:
        raise _refuse("variance_type", variance_type, "fixed_small, fixed_small_log, fixed_large or learned_range "
                      "('learned' reads the channels as a variance, fastdiff as a log-variance; diffusers' "
                      "fixed_large_log takes the square root of a log)", where)
    variance = _VARIANCES[variance_type]
    if learned_output and variance != "learned_range":
        variance = "learned_range"  # DDIMScheduler has no variance_type; a 2C-channel U-Net learned it
        if variance_type is not None:
            raise InputError(f"{where}: variance_type={variance_type!r} but the U-Net outputs twice its input "
                             "channels (a learned variance): expected 'learned_range'")
    if variance == "learned_range" and not learned_output:
        raise InputError(f"{where}: variance_type='learned_range' but the U-Net's out_channels equal its "
                         "in_channels (no variance channels)")
    if c["thresholding"]:
        raise _refuse("thresholding", True, "False (dynamic thresholding is not implemented)", where)
    if c["rescale_betas_zero_snr"]:
        raise _refuse("rescale_betas_zero_snr", True, "False (abar_T = 0 has no eps parameterisation)", where)
    if c["timestep_spacing"] not in _SPACINGS:
        raise _refuse("timestep_spacing", c["timestep_spacing"], "'leading', 'trailing' or 'linspace'", where)
    offset = c["steps_offset"]
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise _refuse("steps_offset", offset, "an int >= 0", where)
    clip = bool(c["clip_sample"])
    if clip and float(c["clip_sample_range"]) != 1.0:
        raise _refuse("clip_sample_range", c["clip_sample_range"], "1.0 when clip_sample is true", where)
    schedule = _betas(c, where)
    final = 1.0 if c.get("set_alpha_to_one", True) else schedule.alphas_cumprod[0].item()
    d = GaussianDiffusion(schedule, prediction=_PREDICTIONS[c["prediction_type"]], variance=variance,
                          loss="hybrid" if variance == "learned_range" else "simple", final_alpha_cumprod=final)
    # diffusers adds steps_offset to "leading" timesteps only
    spacing: Union[str, Callable] = (DiffusersSpacing("leading", schedule.T, offset)
                                     if c["timestep_spacing"] == "leading" and offset else _SPACINGS[c["timestep_spacing"]])
    return d, spacing, clip, not_used


def scheduler_config_from_diffusion(d: GaussianDiffusion) -> Tuple[str, dict]:
    """(scheduler class, config) that gives diffusers the diffusion `d`: DDIMScheduler for a
    fixed_small variance, DDPMScheduler (with its variance_type) otherwise."""
    if d.variance == "learned":
        raise UserError("variance='learned': diffusers' variance_type='learned' reads the channels as a variance, "
                        "fastdiff's as a log-variance; it cannot be exported")
    if not torch.equal(d.timestep_map, torch.arange(d.T)):
        raise UserError("a respaced diffusion cannot be exported (diffusers' schedulers start from all T steps)")
    prediction = {v: k for k, v in _PREDICTIONS.items()}[d.prediction]
    T = d.T
    base = dict(num_train_timesteps=T, prediction_type=prediction, clip_sample=True, clip_sample_range=1.0,
                timestep_spacing="leading", steps_offset=0, thresholding=False, trained_betas=None)
    for candidate in (dict(beta_schedule="squaredcos_cap_v2"),
                      dict(beta_schedule="linear", beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T)):
        trial = {**_SCHEDULER_COMMON, **base, **candidate}
        if torch.equal(_betas(trial, "export").betas, d.betas):
            base.update(candidate)
            break
    else:
        base.update(beta_schedule="linear", trained_betas=d.betas.tolist())  # exact float64 values
    if d.variance == "fixed_small":
        name = "DDIMScheduler"
        if d.final_alpha_cumprod == 1.0:
            base["set_alpha_to_one"] = True
        elif d.final_alpha_cumprod == d.alphas_cumprod[0].item():
            base["set_alpha_to_one"] = False
        else:
            raise UserError(f"final_alpha_cumprod={d.final_alpha_cumprod}: diffusers can only end on 1 or abar_0")
    else:
        if d.final_alpha_cumprod != 1.0:
            raise UserError(f"final_alpha_cumprod={d.final_alpha_cumprod} with variance={d.variance!r}: "
                            "DDPMScheduler always ends on abar = 1")
        name = "DDPMScheduler"
        base["variance_type"] = d.variance
    return name, {"_class_name": name, "_diffusers_version": DIFFUSERS_VERSION, **base}


# --------------------------------------------------------------------------- load
def load_diffusers(path, device="cpu") -> Tuple[UNet, dict]:
    """(model, info) from a diffusers UNet2DModel folder or pixel-space pipeline folder.

    The model carries the scheduler as `diffusion`, `default_spacing` (its timestep_spacing +
    steps_offset) and `default_clip_denoised` (its clip_sample). A U-Net folder without a
    scheduler gets diffusers' DDPMScheduler defaults (linear 1e-4..0.02, T=1000, epsilon)."""
    path = Path(os.path.expanduser(str(path)))
    scheduler_config: Optional[dict] = None
    unet_dir = path
    if (path / PIPELINE_INDEX).is_file():
        index = _read_json(path / PIPELINE_INDEX)
        parts = {k: v for k, v in index.items() if not k.startswith("_")}
        extra = sorted(k for k, v in parts.items() if k not in ("unet", "scheduler") and v not in (None, [None, None]))
        if extra:
            raise InputError(f"{path / PIPELINE_INDEX}: components {extra} besides unet and scheduler: fastdiff "
                             "imports pixel-space pipelines (a U-Net and a scheduler) only")
        unet_entry = parts.get("unet")
        if not isinstance(unet_entry, list) or len(unet_entry) != 2 or unet_entry[1] != "UNet2DModel":
            raise InputError(f"{path / PIPELINE_INDEX}: unet={unet_entry!r}: expected ['diffusers', 'UNet2DModel']")
        unet_dir = path / "unet"
        if "scheduler" in parts:
            scheduler_config = _read_json(path / "scheduler" / SCHEDULER_CONFIG)
    config = _read_json(unet_dir / UNET_CONFIG)
    where = str(unet_dir / UNET_CONFIG)
    kwargs = unet_kwargs_from_config(config, where)
    learned = kwargs["out_channels"] == 2 * kwargs["in_channels"]
    sched_where = str(path / "scheduler" / SCHEDULER_CONFIG)
    d, spacing, clip, not_used = diffusion_from_scheduler(
        scheduler_config if scheduler_config is not None else {"_class_name": "DDPMScheduler", "variance_type": None},
        learned, sched_where)
    ours = config.get(FASTDIFF_KEY) or {}
    if ours.get("loss") in ("hybrid", "vlb") or (ours.get("loss") == "simple" and not d.learned_variance):
        d = GaussianDiffusion(d.schedule, prediction=d.prediction, variance=d.variance, loss=ours["loss"],
                              final_alpha_cumprod=d.final_alpha_cumprod)
    model = UNet(diffusion=d, **kwargs)
    tensors = _load_weights(unet_dir)
    state = state_dict_from_diffusers(tensors, model, str(unet_dir))
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise InputError(f"{unet_dir}: the weights do not fit the config ({e})") from None
    model.default_spacing = spacing
    model.default_clip_denoised = clip
    model.default_guidance_scale = float(ours.get("default_guidance_scale", 0.0))
    info = {"source": str(path), "format": "diffusers", "step": None, "weights": "diffusers",
            "unet_config": config, "scheduler_config": scheduler_config, "scheduler_fields_not_used": not_used}
    return model.to(device).eval(), info


# --------------------------------------------------------------------------- export
def export_diffusers(model: UNet, out, dtype: torch.dtype = torch.float32) -> Path:
    """Write `model` as a diffusers pipeline folder (DDIMPipeline, or DDPMPipeline for a fixed_large
    or learned_range variance): model_index.json, unet/ (config.json + safetensors) and scheduler/.
    Everything is checked before anything is written; `out` must not exist or be an empty folder."""
    from safetensors.torch import save as st_save

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder (nothing written)")
    unet_config = config_from_unet(model)
    scheduler_name, scheduler_config = scheduler_config_from_diffusion(model.diffusion)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict_to_diffusers(model).items()}
    pipeline = "DDIMPipeline" if scheduler_name == "DDIMScheduler" else "DDPMPipeline"
    index = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", scheduler_name], "unet": ["diffusers", "UNet2DModel"]}
    def as_json(obj) -> bytes:
        return (json.dumps(obj, indent=2) + "\n").encode()

    return atomic_write_folder(out, {
        PIPELINE_INDEX: as_json(index), f"unet/{UNET_CONFIG}": as_json(unet_config),
        f"unet/{WEIGHTS_SAFETENSORS}": st_save(tensors, metadata={"format": "pt"}),
        f"scheduler/{SCHEDULER_CONFIG}": as_json(scheduler_config)})
