"""What a training run depends on (`TrainConfig`, saved in every checkpoint and the source of
`fastdiff train`'s options), and the pieces built from it: the diffusion, the U-Net, the
learning-rate and EMA schedules, and the per-step seeds."""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from fastdiff.diffusion import LOSSES, PREDICTIONS, T_SAMPLERS, VARIANCES, GaussianDiffusion
from fastdiff.models.unet import PRESETS, UNet
from fastdiff.options import nonneg_float, nonneg_int, option, positive_float, positive_int, step_list
from fastdiff.schedule import NoiseSchedule
from fastdiff.sde import WEIGHTINGS, ContinuousTimeLoss, VESDE

SDE_NAMES = ("vp", "ve")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")

# Fields of a resumed run that may differ from the checkpoint's config.
RESUMABLE_OVERRIDES = ("steps", "out", "resume", "save_every", "sample_every", "sample_at_end", "progress",
                       "max_minutes", "max_nonfinite", "keep_checkpoints", "log_every", "guidance_scale",
                       "lr_milestones", "lr_gamma", "device", "overwrite", "divergence_factor", "compile")
# Of those, the ones whose None means "not given: keep the recorded value".
KEPT_WHEN_NONE = ("guidance_scale", "lr_milestones", "lr_gamma")
# The classifier-free guidance w a class-conditional model trained with label dropout samples
# at unless told otherwise (see TrainConfig.guidance_scale).
DEFAULT_GUIDANCE_SCALE = 3.0
DEFAULT_LR_GAMMA = 0.1
SCHEDULES = ("linear", "cosine")
# Explicit bounds on sizes read from the command line or a file: above them a run would only
# allocate without end (a T = 10**9 schedule, a 20000 x 20000 image set).
MAX_T = 100_000
MAX_IMAGE_SIZE = 1024
# Fields every saved config must hold (they define the model and its diffusion): a record
# without one is refused rather than read with a default (T = 1000 for a T = 50 model).
REQUIRED_RECORD_FIELDS = ("data", "steps", "preset", "image_size", "schedule", "T", "prediction", "variance",
                          "loss", "class_cond", "p_uncond", "guidance_scale")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint. Each field is also a
    `fastdiff train` option (fastdiff.options)."""
    data: str = option("shapes", "'shapes' (embedded), 'digits' (scikit-learn), a folder of images, a CIFAR-10 "
                       "binary folder/.bin file, or a .npz file (keys x/images, y/labels)", required=True)
    out: str = option("runs/fastdiff", "run folder: checkpoints, samples, loss curve", required=True)
    steps: int = option(1000, "total training steps", type=positive_int, required=True)
    preset: str = option("tiny", "U-Net preset", choices=sorted(PRESETS))
    batch_size: int = option(32, "per-process batch size", type=positive_int)
    seed: int = option(0, "seed of everything random in the run")
    image_size: int = option(32, "image resolution", type=positive_int)
    dataset_size: Optional[int] = option(None, "size of the generated 'shapes' set (default: 10000)",
                                         type=positive_int)
    # optimisation
    lr: float = option(2e-4, "peak learning rate", type=positive_float)
    weight_decay: float = option(0.0, "AdamW weight decay", type=nonneg_float)
    warmup_steps: int = option(500, "linear LR warm-up steps (Ho et al.: 5000)", flag="--warmup", type=nonneg_int)
    lr_milestones: Optional[Tuple[int, ...]] = option(
        None, "comma-separated steps at which the LR is multiplied by --lr-gamma (default: none); may be "
        "given on --resume", type=step_list, metavar="STEPS")
    lr_gamma: Optional[float] = option(None, f"LR factor at each milestone (default: {DEFAULT_LR_GAMMA})",
                                       type=positive_float)
    grad_clip: float = option(1.0, "max gradient norm, 0 disables", type=nonneg_float)
    ema_rate: float = option(0.9999, "EMA decay of the sampling weights", type=nonneg_float)
    bf16: bool = option(False, "bf16 autocast of the model")
    channels_last: bool = option(False, "channels_last memory format")
    compile: Optional[str] = option(
        None, "compile the training step with torch.compile: the model's forward and backward, and gradient "
        "clipping + AdamW + EMA (fastdiff.optimization.CompiledUpdate). 'inductor' generates fused code (the "
        "first steps compile, for minutes on a CPU); 'aot_eager' only traces (checks). The results equal the "
        "eager step's up to float rounding; checkpoints are the same, and a resumed run may switch",
        choices=COMPILE_BACKENDS)
    # diffusion
    schedule: str = option("linear", "noise schedule", choices=SCHEDULES)
    T: int = option(1000, "diffusion steps", type=positive_int)
    prediction: str = option("eps", "what the network predicts", choices=PREDICTIONS)
    variance: Optional[str] = option(None, "default: fixed_small for --loss simple, learned_range otherwise",
                                     choices=VARIANCES)
    loss: str = option("simple", "training loss", choices=LOSSES)
    t_sampler: str = option("uniform", "how t is drawn (importance: Nichol & Dhariwal Eq. 103)",
                            choices=T_SAMPLERS)
    sde: Optional[str] = option(None, "continuous-time training (Song et al. 2021; docs/score-based.md): 'vp' "
                                "(the --schedule as a VP SDE, t ~ U(1/T, 1)) or 've' (sigma 0.01..50 in Karras' "
                                "VP scaling); the model stays a discrete-time model of its schedule",
                                choices=SDE_NAMES)
    weighting: str = option("simple", "with --sde: lambda(t) = sigma^2 ('simple', eps-MSE) or g^2 ('likelihood', "
                            "t drawn in proportion to g^2 / sigma^2)", choices=WEIGHTINGS)
    # model
    dropout: Optional[float] = option(None, "default: the preset's", type=nonneg_float)
    class_cond: bool = option(False, "condition on the dataset's labels")
    p_uncond: float = option(0.1, "label dropout (classifier-free guidance)", type=nonneg_float)
    guidance_scale: Optional[float] = option(
        None, f"default classifier-free guidance w recorded with the model for sampling (default: "
        f"{DEFAULT_GUIDANCE_SCALE:g} with --class-cond and --p-uncond > 0, else 0)", type=nonneg_float)
    model: Dict[str, Any] = option(help="further UNet keyword arguments", default_factory=dict, cli=False)
    autoencoder: Optional[str] = option(
        None, "latent diffusion (Rombach et al.): train on the latents of this autoencoder folder (a diffusers "
        "AutoencoderKL folder, e.g. from `fastdiff train-autoencoder`), copied into --out; --image-size is the "
        "images' size and the U-Net runs at image-size / f", metavar="DIR")
    # bookkeeping
    save_every: int = option(500, "checkpoint every N steps", type=positive_int)
    sample_every: int = option(0, "sample grid every N steps (0: at the end)", type=nonneg_int)
    sample_at_end: bool = option(True, cli=False)
    sample_n: int = option(16, "images in each sample grid", type=positive_int)
    sample_steps: int = option(50, "DDIM steps of the sample grids", type=positive_int)
    log_every: int = option(10, "progress-bar loss average over N steps", type=positive_int)
    keep_checkpoints: int = option(2, "weights files kept", type=positive_int)
    max_nonfinite: int = option(20, "stop after more skipped steps (non-finite or exploding loss) than this",
                                type=nonneg_int)
    divergence_factor: float = option(
        1000.0, "a loss above this many times the median of the recent losses is an explosion: the step is "
        "skipped and counted with the non-finite ones (0 disables)", type=nonneg_float)
    max_minutes: Optional[float] = option(None, "wall-clock budget", type=positive_float)
    resume: bool = option(False, "continue from the checkpoint in --out")
    overwrite: bool = option(False, "start from scratch in an --out that holds a run (its checkpoints are replaced)")
    progress: bool = option(True, "no progress bar", flag="--no-progress")
    device: str = option("auto", "auto | cpu | cuda[:i] (a device that is not there is an error)")

    def validate(self) -> "TrainConfig":
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(self.preset in PRESETS, f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        need(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        need(self.sde is None or self.sde in SDE_NAMES, f"sde must be one of {SDE_NAMES} or None, got {self.sde!r}")
        need(self.weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        need(self.sde is None or (self.loss == "simple" and self.variance in (None, "fixed_small", "fixed_large")),
             f"sde={self.sde!r} trains the mean only: use loss='simple' with a fixed variance, got "
             f"loss={self.loss!r}, variance={self.variance!r}")
        need(self.sde is not None or self.weighting == "simple",
             f"weighting={self.weighting!r} needs continuous-time training (--sde vp|ve)")
        need(self.t_sampler in T_SAMPLERS, f"t_sampler must be one of {T_SAMPLERS}, got {self.t_sampler!r}")
        need(self.prediction in PREDICTIONS, f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        need(self.variance is None or self.variance in VARIANCES,
             f"variance must be one of {VARIANCES}, got {self.variance!r}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(self.compile is None or self.compile in COMPILE_BACKENDS,
             f"compile must be None or one of {COMPILE_BACKENDS}, got {self.compile!r}")
        for name in ("steps", "batch_size", "T", "save_every", "sample_n", "sample_steps", "log_every",
                     "keep_checkpoints"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr!r}")
        need(0.0 <= self.ema_rate < 1.0, f"ema_rate must be in [0, 1), got {self.ema_rate!r}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.lr_milestones is not None:
            self.lr_milestones = tuple(self.lr_milestones)  # a list when read back from JSON
            need(all(isinstance(m, int) and m >= 1 for m in self.lr_milestones) and
                 list(self.lr_milestones) == sorted(set(self.lr_milestones)),
                 f"lr_milestones must be increasing positive step numbers, got {self.lr_milestones!r}")
        need(self.lr_gamma is None or (0 < self.lr_gamma <= 1 and math.isfinite(self.lr_gamma)),
             f"lr_gamma must be in (0, 1], got {self.lr_gamma!r}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip!r}")
        need(0.0 <= self.p_uncond < 1.0, f"p_uncond must be in [0, 1), got {self.p_uncond!r}")
        need(self.guidance_scale is None or (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0),
             f"guidance_scale must be None or a finite number >= 0, got {self.guidance_scale!r}")
        need(self.max_nonfinite >= 0, f"max_nonfinite must be >= 0, got {self.max_nonfinite!r}")
        need(self.divergence_factor == 0 or (math.isfinite(self.divergence_factor) and self.divergence_factor > 1),
             f"divergence_factor must be 0 (off) or a finite number > 1, got {self.divergence_factor!r}")
        need(not (self.resume and self.overwrite), "resume and overwrite exclude each other: --resume continues "
             "the run in --out, --overwrite starts a new one over it")
        need(self.T <= MAX_T, f"T must be at most {MAX_T}, got {self.T}")
        need(self.image_size <= MAX_IMAGE_SIZE, f"image_size must be at most {MAX_IMAGE_SIZE}, got {self.image_size}")
        need(self.dataset_size is None or (isinstance(self.dataset_size, int) and self.dataset_size >= 1),
             f"dataset_size must be None or a positive integer, got {self.dataset_size!r}")
        need(self.sample_steps <= self.T, f"sample_steps={self.sample_steps} must be <= T={self.T}")
        need(self.autoencoder is None or (isinstance(self.autoencoder, str) and self.autoencoder.strip() != ""),
             f"autoencoder must be None or an autoencoder folder, got {self.autoencoder!r}")
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


def _type_ok(value, hint) -> bool:
    """Whether a value read back from JSON has the field's declared type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return True  # Any


def config_from_dict(d: dict, strict: bool = False) -> TrainConfig:
    """The TrainConfig a saved record holds. Unknown keys are ignored (a newer version's); with
    strict (a file read back), each value must have its field's type, the fields that define
    the model and its diffusion (REQUIRED_RECORD_FIELDS) must be there, and the bounds of
    `validate` hold: else ValueError naming the field. Fields added since (bookkeeping, new
    options) take their defaults."""
    if not isinstance(d, dict):
        raise ValueError(f"the training config must be a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if strict:
        missing = [k for k in REQUIRED_RECORD_FIELDS if k not in d]
        if missing:
            raise ValueError(f"the training config lacks {', '.join(missing)}")
        hints = typing.get_type_hints(TrainConfig)
        for k, v in d.items():
            if k in fields and not _type_ok(v, hints[k]):
                raise ValueError(f"the training config's {k!r} must be of type {hints[k]}, got {v!r:.60}")
    config = TrainConfig(**{k: v for k, v in d.items() if k in fields})
    return config.validate() if strict else config


def merge_resumed(saved: TrainConfig, given: TrainConfig) -> Tuple[TrainConfig, List[str]]:
    """The config a resumed run continues with: the checkpoint's, with the fields a resume may
    change taken from `given` (those in KEPT_WHEN_NONE only when given). Returns it and the
    names of the settings where `given` differed but the checkpoint's value was kept."""
    def as_saved(v):  # tuples come back from JSON as lists
        return None if v is None else list(v) if isinstance(v, tuple) else v
    kept = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RESUMABLE_OVERRIDES
            and as_saved(getattr(saved, f.name)) != as_saved(getattr(given, f.name))]
    merged = dataclasses.replace(saved)
    for name in RESUMABLE_OVERRIDES:
        if name in KEPT_WHEN_NONE and getattr(given, name) is None:
            continue
        setattr(merged, name, getattr(given, name))
    return merged.validate(), kept


# --------------------------------------------------------------------------- building
def build_diffusion(config: TrainConfig) -> GaussianDiffusion:
    if getattr(config, "sde", None) == "ve":
        schedule = VESDE().schedule(config.T)  # the VE SDE as a VP schedule (fastdiff.sde.VESDE.schedule)
    else:
        schedule = NoiseSchedule.named(config.schedule, config.T)
    return GaussianDiffusion(schedule, prediction=config.prediction, variance=config.resolved_variance,
                             loss=config.loss, t_sampler=config.t_sampler)


def build_continuous_loss(config: TrainConfig, diffusion: GaussianDiffusion) -> Optional[ContinuousTimeLoss]:
    """The continuous-time DSM loss of --sde (None for discrete-time training)."""
    if getattr(config, "sde", None) is None:
        return None
    return ContinuousTimeLoss(diffusion.schedule, weighting=config.weighting, prediction=config.prediction)


def build_model(config: TrainConfig, in_channels: int, num_classes: Optional[int],
                image_size: Optional[int] = None) -> UNet:
    """The U-Net of a run; image_size (default: config.image_size) is the latent size of an --autoencoder run."""
    kwargs = dict(config.model)
    kwargs.update(image_size=image_size or config.image_size, in_channels=in_channels)
    if config.dropout is not None:
        kwargs["dropout"] = config.dropout
    if config.class_cond:
        if not num_classes:
            raise ValueError(f"class_cond needs a labelled dataset; {config.data!r} has no labels")
        kwargs["num_classes"] = num_classes
    return UNet.preset(config.preset, diffusion=build_diffusion(config), **kwargs)


def step_seed(*values: int) -> int:
    """A 63-bit seed from integers (seed, step, rank, stream), stable across runs."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up to config.lr, times lr_gamma for every milestone step already reached."""
    gamma = DEFAULT_LR_GAMMA if config.lr_gamma is None else config.lr_gamma
    lr = config.lr * gamma ** sum(step >= m for m in (config.lr_milestones or ()))
    if config.warmup_steps <= 0:
        return lr
    return lr * min(1.0, (step + 1) / config.warmup_steps)


def ema_rate_at(config: TrainConfig, step: int) -> float:
    # EMA warm-up (as in many DDPM codebases): short runs are not stuck at the random init
    return min(config.ema_rate, (1.0 + step) / (10.0 + step))
