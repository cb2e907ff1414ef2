"""Training: AdamW with warm-up, gradient clipping, EMA, bf16 autocast, every loss and
t-sampler of GaussianDiffusion, atomic checkpoints with exact resume, and DDP under torchrun.

Exactness: everything random in step s (the batch, t, the noise, label dropout, dropout
masks) is drawn from generators seeded by (seed, step, rank), and a checkpoint holds the
model, EMA, optimizer and t-sampler state bit for bit, so on the CPU N steps in one run
and N/2 + resume + N/2 give identical weights.

Checkpoint layout in `out`: `checkpoint.json` (the commit record: config, step, RNG states,
data position, t-sampler state, and the name of the weights file) and
`ckpt-<step>.safetensors` (model, EMA, optimizer tensors). Each file is written atomically
(temp file in the same folder, flush + fsync, os.replace, fsync of the folder), weights
first and the JSON last, and the weights file a JSON names is deleted only once a newer
JSON is committed: a kill at any moment leaves the last good checkpoint readable.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from fastdiff.data import StepSampler, load_dataset
from fastdiff.diffusion import LOSSES, PREDICTIONS, T_SAMPLERS, VARIANCES, GaussianDiffusion
from fastdiff.models.unet import PRESETS, UNet
from fastdiff.schedule import NoiseSchedule

CHECKPOINT_JSON = "checkpoint.json"
FORMAT = "fastdiff-checkpoint-1"
# Fields of a resumed run that may differ from the checkpoint's config.
RESUMABLE_OVERRIDES = ("steps", "out", "resume", "save_every", "sample_every", "sample_at_end", "progress",
                       "max_minutes", "max_nonfinite", "keep_checkpoints", "log_every", "guidance_scale")
# The classifier-free guidance w a class-conditional model trained with label dropout samples
# at unless told otherwise (see TrainConfig.guidance_scale).
DEFAULT_GUIDANCE_SCALE = 3.0
MODEL_FORMAT = "fastdiff-model-1"


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint."""
    data: str = "shapes"
    out: str = "runs/fastdiff"
    steps: int = 1000
    preset: str = "tiny"
    batch_size: int = 32
    seed: int = 0
    image_size: int = 32
    dataset_size: Optional[int] = None   # size of the generated "shapes" set (default 10000)
    # optimisation
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 500              # linear LR warm-up (Ho et al.: 5000)
    lr_milestones: Tuple[int, ...] = ()  # steps at which the LR is multiplied by lr_gamma
    lr_gamma: float = 0.1
    grad_clip: float = 1.0
    ema_rate: float = 0.9999
    bf16: bool = False                   # bf16 autocast of the model
    channels_last: bool = False
    # diffusion
    schedule: str = "linear"
    T: int = 1000
    prediction: str = "eps"
    variance: Optional[str] = None       # default: fixed_small for loss=simple, else learned_range
    loss: str = "simple"
    t_sampler: str = "uniform"
    # model
    dropout: Optional[float] = None      # default: the preset's
    class_cond: bool = False
    p_uncond: float = 0.1                # label dropout for classifier-free guidance
    guidance_scale: Optional[float] = None  # the model's default w at sampling; None: DEFAULT_GUIDANCE_SCALE
                                         # when class_cond with p_uncond > 0, else 0
    model: Dict[str, Any] = field(default_factory=dict)  # further UNet keyword arguments
    # bookkeeping
    save_every: int = 500
    sample_every: int = 0                # 0: only at the end
    sample_at_end: bool = True
    sample_n: int = 16
    sample_steps: int = 50
    log_every: int = 10
    keep_checkpoints: int = 2
    max_nonfinite: int = 20              # stop once more non-finite losses than this were skipped
    max_minutes: Optional[float] = None  # wall-clock budget for the loop
    resume: bool = False
    progress: bool = True
    device: str = "auto"

    def validate(self) -> "TrainConfig":
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(self.preset in PRESETS, f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        need(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        need(self.t_sampler in T_SAMPLERS, f"t_sampler must be one of {T_SAMPLERS}, got {self.t_sampler!r}")
        need(self.prediction in PREDICTIONS, f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        need(self.variance is None or self.variance in VARIANCES,
             f"variance must be one of {VARIANCES}, got {self.variance!r}")
        need(self.schedule in ("linear", "cosine"), f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        for name in ("steps", "batch_size", "T", "save_every", "sample_n", "sample_steps", "log_every",
                     "keep_checkpoints"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr!r}")
        need(0.0 <= self.ema_rate < 1.0, f"ema_rate must be in [0, 1), got {self.ema_rate!r}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        self.lr_milestones = tuple(self.lr_milestones)  # a list when read back from JSON
        need(all(isinstance(m, int) and m >= 1 for m in self.lr_milestones) and
             list(self.lr_milestones) == sorted(set(self.lr_milestones)),
             f"lr_milestones must be increasing positive step numbers, got {self.lr_milestones!r}")
        need(0 < self.lr_gamma <= 1 and math.isfinite(self.lr_gamma),
             f"lr_gamma must be in (0, 1], got {self.lr_gamma!r}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip!r}")
        need(0.0 <= self.p_uncond < 1.0, f"p_uncond must be in [0, 1), got {self.p_uncond!r}")
        need(self.guidance_scale is None or (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0),
             f"guidance_scale must be None or a finite number >= 0, got {self.guidance_scale!r}")
        need(self.max_nonfinite >= 0, f"max_nonfinite must be >= 0, got {self.max_nonfinite!r}")
        need(self.sample_steps <= self.T, f"sample_steps={self.sample_steps} must be <= T={self.T}")
        return self

    @property
    def resolved_variance(self) -> str:
        return self.variance or ("fixed_small" if self.loss == "simple" else "learned_range")

    @property
    def resolved_guidance_scale(self) -> float:
        """The w `fastdiff.sample(model, y=...)` uses when given none: guidance needs the
        unconditional branch that label dropout trains, so 0 without it."""
        if not self.class_cond or self.p_uncond == 0:
            return 0.0
        return DEFAULT_GUIDANCE_SCALE if self.guidance_scale is None else float(self.guidance_scale)


@dataclass
class TrainResult:
    step: int
    status: str                        # "done" | "time" | "nonfinite"
    message: str
    out: str
    losses: List[Tuple[int, float]]
    nonfinite_skipped: int
    steps_per_s: float
    samples_per_s: float
    seconds: float


# --------------------------------------------------------------------------- building
def build_diffusion(config: TrainConfig) -> GaussianDiffusion:
    schedule = NoiseSchedule.named(config.schedule, config.T)
    return GaussianDiffusion(schedule, prediction=config.prediction, variance=config.resolved_variance,
                             loss=config.loss, t_sampler=config.t_sampler)


def build_model(config: TrainConfig, in_channels: int, num_classes: Optional[int]) -> UNet:
    kwargs = dict(config.model)
    kwargs.update(image_size=config.image_size, in_channels=in_channels)
    if config.dropout is not None:
        kwargs["dropout"] = config.dropout
    if config.class_cond:
        if not num_classes:
            raise ValueError(f"class_cond needs a labelled dataset; {config.data!r} has no labels")
        kwargs["num_classes"] = num_classes
    return UNet.preset(config.preset, diffusion=build_diffusion(config), **kwargs)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (seed, step, rank, stream), stable across runs."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up to config.lr, times lr_gamma for every milestone step already reached."""
    lr = config.lr * config.lr_gamma ** sum(step >= m for m in config.lr_milestones)
    if config.warmup_steps <= 0:
        return lr
    return lr * min(1.0, (step + 1) / config.warmup_steps)


# --------------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_hook(path: Path, tag: str) -> None:
    """Test hook: FASTDIFF_TEST_SAVE_HOOK=sleep:SECONDS|raise, fired between writing the
    temp file and the rename, when "<file name>@<tag>" ends with FASTDIFF_TEST_SAVE_HOOK_MATCH
    (the tag of a checkpoint file is its step)."""
    hook = os.environ.get("FASTDIFF_TEST_SAVE_HOOK")
    if not hook or not f"{path.name}@{tag}".endswith(os.environ.get("FASTDIFF_TEST_SAVE_HOOK_MATCH", "")):
        return
    if hook.startswith("sleep"):
        print(f"[save hook] sleeping before renaming {path.name}", file=sys.stderr, flush=True)
        time.sleep(float(hook.partition(":")[2] or 3600))
    elif hook == "raise":
        raise RuntimeError(f"save hook: simulated failure while saving {path.name}")


def atomic_write_bytes(path, data: bytes, tag: str = "") -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _save_hook(path, tag)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- checkpoints
def _flatten_optimizer(opt: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    state: Dict[int, Dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict:
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


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _state_tensors(prefix: str, module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(out: Path, step: int, config: TrainConfig, model: UNet, ema: UNet,
                    opt: torch.optim.Optimizer, diffusion: GaussianDiffusion, sampler: StepSampler,
                    nonfinite: int, extra: Optional[dict] = None) -> Path:
    from safetensors.torch import save as st_save

    out.mkdir(parents=True, exist_ok=True)
    tensors = {**_state_tensors("model", model), **_state_tensors("ema", ema)}
    opt_tensors, opt_meta = _flatten_optimizer(opt)
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
        "rng": _rng_state(),
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
        raise ValueError(f"{path}: unreadable checkpoint record ({e})") from None
    if record.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fastdiff checkpoint (format {record.get('format')!r})")
    return record


def _load_tensors(out: Path, record: dict) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = out / record["weights"]
    try:
        return load_file(str(weights))
    except Exception as e:
        raise ValueError(f"{weights}: cannot read checkpoint weights ({type(e).__name__}: {e})") from None


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
    tensors = _load_tensors(out, record)
    prefix = "ema." if ema else "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    model.default_guidance_scale = config.resolved_guidance_scale
    return model.to(device).eval(), record


_EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_model(run, path, ema: bool = True, dtype: str = "fp32") -> Path:
    """Write the weights of a training run (EMA unless ema=False) as one self-describing
    safetensors file: the tensors (stored as `dtype`: "fp32", "fp16" or "bf16"; loaded back
    as fp32) and, in its metadata, the U-Net and diffusion configuration and the default
    guidance scale. `load_model` reads it; a few MB instead of a checkpoint's optimizer state."""
    from safetensors.torch import save as st_save

    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_EXPORT_DTYPES)}, got {dtype!r}")
    model, record = load_checkpoint(run, ema=ema)
    tensors = {k: (v.to(_EXPORT_DTYPES[dtype]) if v.is_floating_point() else v).contiguous()
               for k, v in model.state_dict().items()}
    config = config_from_dict(record["config"])
    metadata = {"format": MODEL_FORMAT, "model_config": json.dumps(record["model_config"]),
                "config": json.dumps(dataclasses.asdict(config)), "step": str(record["step"]),
                "weights": "ema" if ema else "model", "stored_dtype": dtype,
                "default_guidance_scale": repr(config.resolved_guidance_scale)}
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
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: not a safetensors model file ({type(e).__name__}: {e})") from None
    if metadata.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a fastdiff model file (format {metadata.get('format')!r}; "
                         f"write one with `fastdiff export`)")
    config = config_from_dict(json.loads(metadata["config"]))
    model = UNet(diffusion=build_diffusion(config), **json.loads(metadata["model_config"]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    model.default_guidance_scale = float(metadata["default_guidance_scale"])
    info = {"config": dataclasses.asdict(config), "step": int(metadata["step"]), "weights": metadata["weights"],
            "source": str(path)}
    return model.to(device).eval(), info


def config_from_dict(d: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------- distributed
def _dist_setup(config: TrainConfig):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and config.device in ("auto", "cuda")
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {config.device!r}")
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, local = 0, 0
    if use_cuda:
        device = torch.device(config.device if config.device.startswith("cuda:") else f"cuda:{local}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


# --------------------------------------------------------------------------- EMA
@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    ema_p = [p for p in ema.parameters()]
    model_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - rate)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def ema_rate_at(config: TrainConfig, step: int) -> float:
    # EMA warm-up (as in many DDPM codebases): short runs are not stuck at the random init
    return min(config.ema_rate, (1.0 + step) / (10.0 + step))


# --------------------------------------------------------------------------- the loop
def _log(msg: str, rank: int) -> None:
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)


def _read_log(path: Path, before_step: int) -> List[Tuple[int, float]]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if rec.get("step", before_step) < before_step:
                out.append((int(rec["step"]), float(rec["loss"])))
    return out


def write_samples(model: UNet, path: Path, n: int, steps: int, seed: int = 0,
                  guidance_scale: float = 0.0) -> torch.Tensor:
    """A grid of n DDIM samples (eta=0) of model into path (PNG), classes in turn for a
    class-conditional model (guided by guidance_scale); returns the samples."""
    from fastdiff.image_utils import save_image_grid
    from fastdiff.sampling import sample

    y = None
    if model.num_classes:
        y = torch.arange(n, device=next(model.parameters()).device) % model.num_classes
    x = sample(model, n=n, steps=steps, eta=0.0, seed=seed, y=y,
               guidance_scale=guidance_scale if y is not None else 0.0)
    save_image_grid(x, path, nrow=int(math.ceil(math.sqrt(n))), scale=2)
    return x


def train(config: TrainConfig) -> TrainResult:
    """Train a UNet on config.data; see TrainConfig. Returns a TrainResult (status "done",
    "time" when max_minutes ran out, "nonfinite" when too many non-finite losses were skipped)."""
    from fastdiff.image_utils import plot_curve

    config.validate()
    out = Path(config.out)
    rank, world, device = _dist_setup(config)
    start_step = 0
    record = None
    if config.resume:
        record = read_checkpoint_record(out, missing_ok=True)
        if record is None:
            _log(f"--resume: no checkpoint in {out}; starting from scratch", rank)
        else:
            saved = config_from_dict(record["config"])
            def as_saved(v):  # tuples come back from JSON as lists
                return json.loads(json.dumps(v))
            differs = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RESUMABLE_OVERRIDES
                       and as_saved(getattr(saved, f.name)) != as_saved(getattr(config, f.name))]
            if differs:
                _log(f"resuming with the checkpoint's settings for {', '.join(differs)}", rank)
            for name in RESUMABLE_OVERRIDES:
                if name == "guidance_scale" and config.guidance_scale is None:
                    continue  # not given: the recorded default stays
                setattr(saved, name, getattr(config, name))
            config = saved.validate()
            start_step = int(record["step"])
    elif read_checkpoint_record(out, missing_ok=True) is not None:
        _log(f"note: {out} holds a checkpoint; starting from scratch over it (--resume continues it)", rank)

    dataset = load_dataset(config.data, image_size=config.image_size, train=True, seed=0, n=config.dataset_size)
    torch.manual_seed(config.seed)
    model = build_model(config, dataset.shape[0], dataset.num_classes).to(device)
    diffusion = model.diffusion
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
        ema = ema.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    nonfinite = 0
    if record is not None:
        tensors = _load_tensors(out, record)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        opt.load_state_dict(_unflatten_optimizer(tensors, record["optimizer"]))
        diffusion.t_sampler.load_state_dict({k: torch.tensor(v) for k, v in record["t_sampler"]["state"].items()})
        _set_rng_state(record["rng"])
        nonfinite = int(record.get("nonfinite_skipped", 0))
        _log(f"resumed from {out / CHECKPOINT_JSON} at step {start_step}", rank)
    sampler = StepSampler(len(dataset), config.batch_size, seed=config.seed, rank=rank, world=world)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # temp files of a save that was killed
            stale.unlink(missing_ok=True)
    log_path = out / "log.jsonl"
    losses = _read_log(log_path, start_step) if rank == 0 else []
    if rank == 0:
        atomic_write_bytes(log_path, "".join(json.dumps({"step": s, "loss": l}) + "\n" for s, l in losses).encode())
    pending_log: List[dict] = []

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)

    def model_fn(x_t, t, **kw):
        with autocast():
            out_ = net(x_t, t, **kw)
        return out_.float()

    def checkpoint(step):
        if rank == 0:
            if pending_log:
                with open(log_path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in pending_log)
                pending_log.clear()
            save_checkpoint(out, step, config, model, ema, opt, diffusion, sampler, nonfinite)
            plot_curve([s for s, _ in losses], [l for _, l in losses], out / "loss.png",
                       title=f"training loss ({config.loss}, {config.preset}, {config.data})",
                       smooth=max(1, min(50, len(losses) // 20)), log_y=True)
        if world > 1:
            dist.barrier()

    def samples(step):
        if rank == 0:
            write_samples(ema, out / "samples" / f"step-{step:08d}.png", config.sample_n, config.sample_steps,
                          seed=config.seed, guidance_scale=config.resolved_guidance_scale)

    status, message = "done", ""
    t_start = time.time()
    timed_steps, t_timed = 0, None
    step = start_step
    bar = None
    if config.progress and rank == 0:
        from tqdm.auto import tqdm
        # a run bounded by the clock (the demo) has no meaningful step total
        total = config.steps if config.max_minutes is None or config.steps < 10 ** 6 else None
        bar = tqdm(total=total, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0)
    model.train()
    try:
        while step < config.steps:
            if t_timed is None and step - start_step == 2:  # skip warm-up steps in the speed figure
                t_timed, timed_steps = time.time(), 0
            for g in opt.param_groups:
                g["lr"] = lr_at(config, step)
            x, y = dataset.batch(sampler.indices(step))
            x = x.to(device, non_blocking=True)
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            gen = torch.Generator().manual_seed(_mix(config.seed, step, rank, 1))
            dev_gen = gen if device.type == "cpu" else torch.Generator(device).manual_seed(_mix(config.seed, step, rank, 2))
            torch.manual_seed(_mix(config.seed, step, rank, 3))  # dropout masks
            t, weights = diffusion.t_sampler.sample(x.shape[0], device, gen)
            noise = torch.randn(x.shape, generator=dev_gen, device=device, dtype=x.dtype)
            kwargs = {}
            if config.class_cond:
                drop = torch.rand(x.shape[0], generator=gen) < config.p_uncond
                y = torch.where(drop, torch.full_like(y, model.num_classes), y)
                kwargs["y"] = y.to(device)
            terms = diffusion.training_losses(model_fn, x, t=t, noise=noise, model_kwargs=kwargs)
            loss = (terms["loss"] * weights).mean()
            # One collective decides for every rank: skip the step if any rank's loss is not
            # finite (the backward's all-reduce must run on all ranks or none).
            flag = torch.stack([loss.detach().float().nan_to_num(0.0, 0.0, 0.0),
                                (~torch.isfinite(loss.detach())).float()])
            if world > 1:
                dist.all_reduce(flag)
                flag[0] /= world
            ok = flag[1].item() == 0
            grad_ok = ok
            if ok:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    grad_ok = bool(torch.isfinite(norm))
                if grad_ok:
                    opt.step()
                    ema_update(ema, model, ema_rate_at(config, step))
                opt.zero_grad(set_to_none=True)
            if not grad_ok:
                nonfinite += 1
                _log(f"step {step}: non-finite {'loss' if not ok else 'gradient'}, step skipped "
                     f"({nonfinite} so far, stopping above {config.max_nonfinite})", rank)
            else:
                vb, tt = terms["vb"].detach().float(), t
                if world > 1:  # every rank's t-sampler sees every rank's losses: they stay equal
                    vbs, ts = [torch.empty_like(vb) for _ in range(world)], [torch.empty_like(tt) for _ in range(world)]
                    dist.all_gather(vbs, vb)
                    dist.all_gather(ts, tt)
                    vb, tt = torch.cat(vbs), torch.cat(ts)
                diffusion.t_sampler.update(tt.cpu(), vb.cpu())
                value = flag[0].item()
                losses.append((step, value))
                pending_log.append({"step": step, "loss": value, "lr": lr_at(config, step)})
            step += 1
            timed_steps += 1
            if bar is not None:
                bar.update(1)
                if step % config.log_every == 0 and losses:
                    bar.set_postfix(loss=f"{np.mean([l for _, l in losses[-config.log_every:]]):.4f}")
            if nonfinite > config.max_nonfinite:
                status = "nonfinite"
                message = (f"stopping at step {step}: {nonfinite} non-finite losses/gradients were skipped "
                           f"(more than max_nonfinite={config.max_nonfinite}); the last good weights are "
                           f"saved in {out / CHECKPOINT_JSON}. Check the data and lower the learning rate.")
                break
            stop = config.max_minutes is not None and time.time() - t_start > 60.0 * config.max_minutes
            if world > 1:
                s = torch.tensor([float(stop)], device=device)  # NCCL needs device tensors
                dist.broadcast(s, 0)
                stop = bool(s.item())
            if stop and step < config.steps:
                status, message = "time", f"stopped at step {step}: the {config.max_minutes} minute budget ran out"
                break
            if step % config.save_every == 0 and step < config.steps:
                checkpoint(step)
            if config.sample_every and step % config.sample_every == 0 and step < config.steps:
                samples(step)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.time() - t_start
    timed = (time.time() - t_timed) if t_timed is not None else elapsed
    steps_per_s = timed_steps / timed if t_timed is not None and timed > 0 and timed_steps else \
        (step - start_step) / max(elapsed, 1e-9)
    checkpoint(step)
    if status != "nonfinite" and config.sample_at_end:
        samples(step)
    if status == "nonfinite":
        _log(message, rank)
    dump = os.environ.get("FASTDIFF_TEST_DUMP_WEIGHTS")
    if dump:  # test hook: every rank's final weights, to check that DDP keeps them equal
        from safetensors.torch import save_file
        Path(dump).mkdir(parents=True, exist_ok=True)
        save_file(_state_tensors("model", model), str(Path(dump) / f"rank{rank}.safetensors"))
    if world > 1:
        dist.barrier()
    return TrainResult(step=step, status=status, message=message, out=str(out), losses=losses,
                       nonfinite_skipped=nonfinite, steps_per_s=steps_per_s,
                       samples_per_s=steps_per_s * config.batch_size * world, seconds=elapsed)
