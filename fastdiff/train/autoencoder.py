"""Training the KL autoencoder of latent diffusion (`fastdiff train-autoencoder`; Rombach et al.
2022, §3 and Appendix G).

The objective per image is LDM's: a reconstruction term summed over the pixels (|x - x̂| or
(x - x̂)^2), plus kl_weight · KL(q(z|x) || N(0, I)) (kl_weight ~1e-6), plus, when asked, a
perceptual term (a user-supplied TorchScript LPIPS-like network; nothing is downloaded) and a
patch-GAN generator term after a warm-up. Everything is divided by the pixel count, so the step
size does not depend on the image size (the weights keep LDM's meaning). The discriminator
(`fastdiff.models.autoencoder.PatchDiscriminator`) is trained with the hinge loss
(Lim & Ye 2017), as in LDM.

The run folder works as `fastdiff train`'s does: one writer (RunLock), atomic checkpoints
(`checkpoint.json` + `ckpt-<step>.safetensors` with the autoencoder, its EMA, the discriminator,
both optimizers and every RNG state), exact resume (each step's batch and posterior noise come from
generators seeded by (seed, step): N steps equal N/2 + resume + N/2 bit for bit on the CPU), a
progress bar, a loss curve and a PNG of held-out reconstructions at each checkpoint. At each
checkpoint and at the end the EMA autoencoder is evaluated (reconstruction PSNR on held-out images;
the latent scaling factor 1 / std of the latents of training images, LDM §4.3.2) and exported into
the run folder itself as a diffusers AutoencoderKL folder (config.json with `scaling_factor`, and
diffusion_pytorch_model.safetensors), so `fastdiff.load_model(out)` and diffusers'
`AutoencoderKL.from_pretrained(out)` read the run folder directly.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fastdiff.data import ImageDataset, StepSampler, load_dataset
from fastdiff.errors import InputError, UserError
from fastdiff.io import RunLock, atomic_write_bytes, check_output_dir, remove_stale_temp_files
from fastdiff.models.autoencoder import (DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS, AutoencoderKL, PatchDiscriminator,
                                         diffusers_folder_files)
from fastdiff.options import nonneg_float, nonneg_int, option, positive_float, positive_int
from fastdiff.runtime import resolve_device
from fastdiff.train.checkpoint import (CHECKPOINT_JSON, MAX_RECORD_BYTES, check_tensor_shapes, file_tensor_shapes,
                                       flatten_optimizer, rng_state, set_rng_state, state_tensors,
                                       unflatten_optimizer)
from fastdiff.train.config import MAX_IMAGE_SIZE, _type_ok, step_seed
from fastdiff.train.ema import ema_update
from fastdiff.train.steps import budget_spent, run_steps, step_progress_bar

FORMAT = "fastdiff-autoencoder-checkpoint-1"
LOSSES = ("l1", "l2")
# Fields of a resumed run that may differ from the checkpoint's config (bookkeeping only).
RESUMABLE_OVERRIDES = ("steps", "out", "resume", "overwrite", "save_every", "progress", "max_minutes",
                       "keep_checkpoints", "log_every", "device", "eval_n", "recon_n")
MAX_WIDTH = 1024
MAX_LEVELS = 6


def positive_int_list(s: str) -> Tuple[int, ...]:
    """'32,64,64' -> (32, 64, 64); argparse type of --block-out-channels."""
    try:
        values = tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (e.g. 32,64,64), got {s!r}") \
            from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (e.g. 32,64,64), got {s!r}")
    return values


@dataclass
class AutoencoderConfig:
    """An autoencoder run; saved in every checkpoint; each field is a `fastdiff train-autoencoder` option."""
    data: str = option("shapes", "'shapes' (embedded), 'digits', a folder of images, CIFAR-10 binaries or a .npz, "
                       "as for `fastdiff train`", required=True)
    out: str = option("runs/autoencoder", "run folder: checkpoints, reconstructions, and the exported "
                      "autoencoder (a diffusers AutoencoderKL folder)", required=True)
    steps: int = option(5000, "total training steps", type=positive_int)
    image_size: int = option(32, "image resolution", type=positive_int)
    dataset_size: Optional[int] = option(None, "size of the generated 'shapes' set (default: 10000)",
                                         type=positive_int)
    batch_size: int = option(16, "batch size", type=positive_int)
    seed: int = option(0, "seed of everything random in the run")
    # the autoencoder (diffusers AutoencoderKL fields); f = 2^(levels - 1)
    block_out_channels: Tuple[int, ...] = option((32, 64, 64), "channel width of each level, comma-separated; "
                                                 "f = 2^(levels-1)", type=positive_int_list, metavar="W1,W2,...")
    layers_per_block: int = option(1, "residual blocks per encoder level (decoder: one more)", type=positive_int)
    latent_channels: int = option(4, "latent channels", type=positive_int)
    norm_num_groups: int = option(8, "GroupNorm groups (must divide every width)", type=positive_int)
    mid_attention: bool = option(True, "no self-attention in the mid blocks", flag="--no-mid-attention")
    # the objective
    loss: str = option("l1", "reconstruction loss", choices=LOSSES)
    kl_weight: float = option(1e-6, "weight of KL(q(z|x) || N(0,I)) against the pixel-summed reconstruction "
                              "term (LDM: 1e-6)", type=nonneg_float)
    lpips: Optional[str] = option(None, "perceptual term: a TorchScript file of a network taking two image "
                                  "batches in [-1, 1] and returning one distance per image (never downloaded)",
                                  metavar="PATH")
    lpips_weight: float = option(1.0, "weight of the --lpips term", type=nonneg_float)
    gan_weight: float = option(0.0, "weight of the patch-GAN generator term (0: no discriminator)",
                               type=nonneg_float)
    gan_start: int = option(0, "step at which the discriminator and the GAN term start (warm-up)",
                            type=nonneg_int, metavar="STEP")
    disc_channels: int = option(32, "width of the discriminator's first layer", type=positive_int)
    disc_lr: Optional[float] = option(None, "discriminator learning rate (default: --lr)", type=positive_float)
    # optimisation
    lr: float = option(5e-4, "peak learning rate (Adam)", type=positive_float)
    warmup_steps: int = option(100, "linear LR warm-up steps", flag="--warmup", type=nonneg_int)
    lr_decay_start: Optional[int] = option(None, "cosine decay of the LR to 0 from this step to --steps "
                                           "(default: none)", type=nonneg_int, metavar="STEP")
    grad_clip: float = option(1.0, "max gradient norm, 0 disables", type=nonneg_float)
    ema_rate: float = option(0.999, "EMA decay of the exported weights", type=nonneg_float)
    # evaluation and bookkeeping
    eval_n: int = option(256, "held-out images for the reconstruction PSNR", type=positive_int)
    scale_n: int = option(1024, "training images whose latents set the scaling factor", type=positive_int)
    recon_n: int = option(8, "held-out images in each reconstruction PNG", type=positive_int)
    save_every: int = option(500, "checkpoint (and evaluate, export) every N steps", type=positive_int)
    log_every: int = option(10, "progress-bar loss average over N steps", type=positive_int)
    keep_checkpoints: int = option(2, "weights files kept", type=positive_int)
    max_nonfinite: int = option(20, "stop after more skipped (non-finite) steps than this", type=nonneg_int)
    max_minutes: Optional[float] = option(None, "wall-clock budget", type=positive_float)
    resume: bool = option(False, "continue from the checkpoint in --out")
    overwrite: bool = option(False, "start from scratch in an --out that holds a run")
    progress: bool = option(True, "no progress bar", flag="--no-progress")
    device: str = option("auto", "auto | cpu | cuda[:i]")

    def validate(self) -> "AutoencoderConfig":
        """ValueError naming the option and the value when a setting cannot work."""
        def need(cond, flag, value, expected):
            if not cond:
                raise ValueError(f"{flag} must be {expected}, got {value!r}")
        self.block_out_channels = tuple(self.block_out_channels)  # a list when read back from JSON
        widths = self.block_out_channels
        need(self.loss in LOSSES, "--loss", self.loss, f"one of {LOSSES}")
        for name in ("steps", "batch_size", "image_size", "layers_per_block", "latent_channels", "norm_num_groups",
                     "disc_channels", "eval_n", "scale_n", "recon_n", "save_every", "log_every", "keep_checkpoints"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 "--" + name.replace("_", "-"), value, "a positive integer")
        need(1 <= len(widths) <= MAX_LEVELS and all(isinstance(w, int) and 1 <= w <= MAX_WIDTH for w in widths),
             "--block-out-channels", widths, f"1 to {MAX_LEVELS} widths in [1, {MAX_WIDTH}]")
        need(all(w % self.norm_num_groups == 0 for w in widths), "--norm-num-groups", self.norm_num_groups,
             f"a divisor of every --block-out-channels width {list(widths)}")
        f = 2 ** (len(widths) - 1)
        need(self.image_size <= MAX_IMAGE_SIZE and self.image_size % f == 0, "--image-size", self.image_size,
             f"a multiple of the downsampling factor f = {f} (from {len(widths)} levels), at most {MAX_IMAGE_SIZE}")
        for name in ("kl_weight", "lpips_weight", "gan_weight", "grad_clip"):
            value = getattr(self, name)
            need(math.isfinite(value) and value >= 0, "--" + name.replace("_", "-"), value, "a finite number >= 0")
        for name in ("lr", "disc_lr"):
            value = getattr(self, name)
            need(value is None or (math.isfinite(value) and value > 0), "--" + name.replace("_", "-"), value,
                 "a finite number > 0")
        need(0.0 <= self.ema_rate < 1.0, "--ema-rate", self.ema_rate, "in [0, 1)")
        need(self.gan_start >= 0, "--gan-start", self.gan_start, "a step >= 0")
        need(self.warmup_steps >= 0, "--warmup", self.warmup_steps, "an integer >= 0")
        need(self.lr_decay_start is None or self.lr_decay_start >= 0, "--lr-decay-start", self.lr_decay_start,
             "a step >= 0")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: --resume continues the run in --out, "
                             "--overwrite starts a new one over it")
        return self

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class AutoencoderResult:
    step: int
    status: str              # "done" | "time" | "nonfinite"
    message: str
    out: str
    psnr_db: float           # held-out reconstruction PSNR of the exported (EMA) autoencoder
    scaling_factor: float    # 1 / std of its latents over training images
    seconds: float
    steps_per_s: float
    losses: List[Tuple[int, float]]


def config_from_record(d: dict) -> AutoencoderConfig:
    """The AutoencoderConfig a checkpoint record holds, each value checked against its field's type
    and the bounds of validate: ValueError naming the field."""
    if not isinstance(d, dict):
        raise ValueError(f"the config must be a JSON object, got {type(d).__name__}")
    hints = typing.get_type_hints(AutoencoderConfig)
    fields = {f.name for f in dataclasses.fields(AutoencoderConfig)}
    for k, v in d.items():
        if k in fields and not _type_ok(v, hints[k]):
            raise ValueError(f"the config's {k!r} must be of type {hints[k]}, got {v!r:.60}")
    return AutoencoderConfig(**{k: v for k, v in d.items() if k in fields}).validate()


def lr_at(config: AutoencoderConfig, step: int) -> float:
    """Linear warm-up to config.lr, then constant, or a cosine to 0 from lr_decay_start to steps."""
    lr = config.lr * (min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0)
    start = config.lr_decay_start
    if start is not None and step >= start and config.steps > start:
        lr *= 0.5 * (1.0 + math.cos(math.pi * (step - start) / (config.steps - start)))
    return lr


# --------------------------------------------------------------------------- measures
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (data range 2, so the value equals the PSNR of the
    same images in [0, 1]): 10 log10(2^2 / MSE). Inputs (B, ...); returns (B,) float64; an exact
    reconstruction gives +inf."""
    if x.shape != y.shape:
        raise ValueError(f"psnr: the two image batches must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse)


@torch.no_grad()
def reconstruct(ae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Decoded posterior means of images (B, C, H, W) in [-1, 1], clamped to [-1, 1], in batches."""
    device = next(ae.parameters()).device
    out = [ae.decode(ae.encode(images[i:i + batch_size].to(device)).mean).clamp(-1, 1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def held_out_psnr(ae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> float:
    """Mean over images of the per-image PSNR (dB) of the reconstructions (posterior means, clamped)."""
    return float(psnr(reconstruct(ae, images, batch_size), images).mean())


@torch.no_grad()
def latent_scaling_factor(ae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64, seed: int = 0) -> float:
    """1 / std of the latents z ~ q(z|x) of `images` over all their elements (LDM §4.3.2: the factor
    that gives the diffusion model unit-variance latents). z is the reparameterised sample, drawn
    from a generator seeded by `seed`; the std is the unbiased one (n - 1), in float64."""
    device = next(ae.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    zs = [ae.encode(images[i:i + batch_size].to(device)).sample(gen).double().cpu()
          for i in range(0, images.shape[0], batch_size)]
    std = float(torch.cat(zs).std())
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"the latents' standard deviation is {std}: no scaling factor (the encoder is degenerate)")
    return 1.0 / std


# --------------------------------------------------------------------------- the objective
def reconstruction_loss(x_rec: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-image mean of |x - x̂| (l1) or (x - x̂)^2 (l2); (B,)."""
    diff = x_rec - x
    return (diff.abs() if kind == "l1" else diff.pow(2)).flatten(1).mean(1)


def autoencoder_terms(ae: AutoencoderKL, x: torch.Tensor, config: AutoencoderConfig,
                      generator: Optional[torch.Generator] = None, lpips: Optional[torch.nn.Module] = None,
                      disc: Optional[torch.nn.Module] = None) -> Dict[str, torch.Tensor]:
    """The autoencoder's loss on batch x and its parts (batch means): "rec", "kl" (per image, summed
    over latents), "lpips" and "gan" when used, and "loss" = rec + (kl_weight kl) / D +
    lpips_weight lpips + gan_weight gan, D the pixel count of one image (see the module docstring).
    The GAN term is the hinge generator loss -D(x̂) (needs `disc`). Also returns "x_rec"."""
    posterior = ae.encode(x)
    x_rec = ae.decode(posterior.sample(generator))
    terms = {"rec": reconstruction_loss(x_rec, x, config.loss).mean(), "kl": posterior.kl().mean()}
    loss = terms["rec"] + config.kl_weight * terms["kl"] / x[0].numel()
    if lpips is not None:
        terms["lpips"] = lpips(x, x_rec).reshape(x.shape[0], -1).mean(1).mean()
        loss = loss + config.lpips_weight * terms["lpips"]
    if disc is not None:
        terms["gan"] = -disc(x_rec).mean()
        loss = loss + config.gan_weight * terms["gan"]
    terms["loss"] = loss
    terms["x_rec"] = x_rec
    return terms


def discriminator_hinge_loss(disc: torch.nn.Module, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x̂))]): the hinge loss of the discriminator (LDM's)."""
    return 0.5 * (F.relu(1.0 - disc(x)).mean() + F.relu(1.0 + disc(x_rec.detach())).mean())


def load_lpips(path: str, device: torch.device, shape: Tuple[int, int, int]) -> torch.nn.Module:
    """The --lpips TorchScript network, frozen, in eval mode, checked on a probe batch of `shape`
    images: it must return one finite distance per image."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"--lpips {path}: no such file (a TorchScript file of a perceptual network; "
                         f"fastdiff never downloads one)")
    try:
        net = torch.jit.load(str(p), map_location=device)
    except Exception as e:  # noqa: BLE001 - torch raises several kinds for a file that is not TorchScript
        raise InputError(f"--lpips {path}: not a TorchScript module ({type(e).__name__}: {str(e)[:200]})") from None
    net = net.eval()
    for q in net.parameters():
        q.requires_grad_(False)
    probe = torch.zeros(2, *shape, device=device)
    try:
        d = net(probe, probe.flip(0))
    except Exception as e:  # noqa: BLE001
        raise InputError(f"--lpips {path}: calling it on two image batches (2, {', '.join(map(str, shape))}) failed "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(d, torch.Tensor) or d.numel() != 2 or not bool(torch.isfinite(d).all()):
        raise InputError(f"--lpips {path}: it must return one finite distance per image (2 values for a batch of "
                         f"2), got {d if not isinstance(d, torch.Tensor) else tuple(d.shape)}")
    return net


def build_autoencoder(config: AutoencoderConfig, channels: int) -> AutoencoderKL:
    widths = config.block_out_channels
    return AutoencoderKL(in_channels=channels, out_channels=channels, block_out_channels=widths,
                         layers_per_block=config.layers_per_block, latent_channels=config.latent_channels,
                         norm_num_groups=config.norm_num_groups, sample_size=config.image_size, scaling_factor=1.0,
                         mid_block_add_attention=config.mid_attention)


def split_data(config: AutoencoderConfig) -> Tuple[ImageDataset, torch.Tensor]:
    """(training set, held-out images in [-1, 1]). For 'shapes' the held-out images are generated
    from the held-out stream (another seed); for any other data the last eval_n of a seeded
    permutation are held out and not trained on."""
    data = load_dataset(config.data, image_size=config.image_size, train=True, seed=0, n=config.dataset_size)
    if config.data == "shapes":
        held = load_dataset("shapes", image_size=config.image_size, train=False, seed=0, n=config.eval_n)
        return data, held.batch(torch.arange(len(held)))[0]
    if len(data) <= config.eval_n:
        raise InputError(f"--data {config.data}: {len(data)} images, not more than --eval-n {config.eval_n} "
                         f"held-out ones: lower --eval-n")
    perm = torch.from_numpy(np.random.default_rng([config.seed, 0xAE]).permutation(len(data)))
    train_idx, held_idx = perm[:-config.eval_n].sort().values, perm[-config.eval_n:].sort().values
    return _Subset(data, train_idx), data.batch(held_idx)[0]


class _Subset:
    """The images of `data` at `indices`, served as the dataset serves them (uint8 or float data alike)."""

    def __init__(self, data: ImageDataset, indices: torch.Tensor):
        self.data, self.indices, self.shape = data, indices, data.shape

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, indices):
        return self.data.batch(self.indices[torch.as_tensor(indices, dtype=torch.long)])


# --------------------------------------------------------------------------- the run
class _AERun:
    """One autoencoder run between steps: config, data, networks, optimizers and the log."""

    def __init__(self, config: AutoencoderConfig):
        config.validate()
        self.out = Path(config.out).expanduser()
        check_output_dir(self.out)
        self.device = resolve_device(config.device)
        self.lock = RunLock(self.out, what="fastdiff train-autoencoder").acquire()
        try:
            self._setup(config)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # what run_steps needs beside optimize and checkpoint
    def progress_bar(self):
        if not self.config.progress:
            return None
        return step_progress_bar(self.config, self.start_step, "train-autoencoder")

    def out_of_time(self, t_start: float) -> bool:
        return budget_spent(self.config, t_start)

    def after_step(self, step: int) -> None:
        pass  # reconstructions are drawn with each checkpoint

    def _setup(self, config: AutoencoderConfig) -> None:
        record = self._read_record(config)
        if record is not None:
            config, kept = _merge_resumed(config_from_record(record["config"]), config)
            if kept:
                self.log(f"resuming with the checkpoint's settings for {', '.join(kept)}")
        self.config = config
        self.start_step = record["step"] if record is not None else 0
        self.data, self.held_out = split_data(config)
        self.sampler = StepSampler(len(self.data), config.batch_size, seed=config.seed)
        self.lpips = load_lpips(config.lpips, self.device, self.data.shape) if config.lpips else None
        self._build(record)
        self.evals: List[dict] = list(record.get("evals", [])) if record is not None else []
        self.nonfinite = record.get("nonfinite_skipped", 0) if record is not None else 0
        self._open_log()

    def _read_record(self, config: AutoencoderConfig) -> Optional[dict]:
        path = self.out / CHECKPOINT_JSON
        if not config.resume:
            if path.exists() and not config.overwrite:
                raise UserError(f"--out {self.out} holds a training run ({CHECKPOINT_JSON}); --resume continues "
                                f"it, --overwrite starts a new run over it, or choose another --out")
            return None
        if not path.exists():
            self.log(f"--resume: no checkpoint in {self.out}; starting from scratch")
            return None
        return read_record(path)

    def _build(self, record: Optional[dict]) -> None:
        """Autoencoder, EMA, discriminator and optimizers, from scratch or from `record`."""
        config = self.config
        torch.manual_seed(config.seed)
        self.ae = build_autoencoder(config, self.data.shape[0]).to(self.device)
        self.ema = copy.deepcopy(self.ae).requires_grad_(False).eval()
        self.opt = torch.optim.Adam(self.ae.parameters(), lr=config.lr, betas=(0.9, 0.99), foreach=True)
        self.disc, self.disc_opt = None, None
        if config.gan_weight > 0:
            self.disc = PatchDiscriminator(self.data.shape[0], config.disc_channels).to(self.device)
            self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=config.disc_lr or config.lr,
                                             betas=(0.5, 0.9), foreach=True)
        if record is None:
            return
        weights = _weights_path(self.out, record)
        shapes, _ = file_tensor_shapes(weights)
        nets = [("model.", self.ae), ("ema.", self.ema)] + ([("disc.", self.disc)] if self.disc is not None else [])
        for prefix, net in nets:
            check_tensor_shapes(net, shapes, weights, prefix=prefix)
        from safetensors.torch import load_file
        tensors = load_file(str(weights))
        try:
            for prefix, net in nets:
                net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            self.opt.load_state_dict(unflatten_optimizer(tensors, record["optimizer"]))
            if self.disc is not None:
                self.disc_opt.load_state_dict(unflatten_optimizer(
                    {"optim." + k[len("doptim."):]: v for k, v in tensors.items() if k.startswith("doptim.")},
                    record["disc_optimizer"]))
            set_rng_state(record["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise InputError(f"{self.out / CHECKPOINT_JSON}: cannot restore the run from it "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
        self.log(f"resumed from {self.out / CHECKPOINT_JSON} at step {self.start_step}")

    def _open_log(self) -> None:
        self.log_path = self.out / "log.jsonl"
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.out, (CHECKPOINT_JSON, "log.jsonl", "ckpt-*.safetensors", DIFFUSERS_CONFIG,
                                           DIFFUSERS_WEIGHTS))
        kept = []
        if self.log_path.is_file():
            for line in self.log_path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] < self.start_step \
                        and isinstance(rec.get("loss"), (int, float)):
                    kept.append(rec)
        self.losses = [(r["step"], float(r["loss"])) for r in kept]
        self.pending: List[dict] = []
        atomic_write_bytes(self.log_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    # ----------------------------------------------------------------------- one step
    def gan_active(self, step: int) -> bool:
        return self.disc is not None and step >= self.config.gan_start

    def optimize(self, step: int) -> Optional[str]:
        """One step of the autoencoder (and of the discriminator once the GAN is on). None when
        applied, else what was not finite (the step is then skipped)."""
        config = self.config
        for group in self.opt.param_groups:
            group["lr"] = lr_at(config, step)
        x, _ = self.data.batch(self.sampler.indices(step))
        x = x.to(self.device)
        gen = torch.Generator(self.device).manual_seed(step_seed(config.seed, step, 0, 1))
        gan = self.gan_active(step)
        if gan:
            self.disc.requires_grad_(False)
        terms = autoencoder_terms(self.ae, x, config, gen, self.lpips, self.disc if gan else None)
        if not bool(torch.isfinite(terms["loss"])):
            return "loss"
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if not _clip_ok(self.ae, config.grad_clip):
            self.opt.zero_grad(set_to_none=True)
            return "gradient"
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        ema_update(self.ema, self.ae, min(config.ema_rate, (1.0 + step) / (10.0 + step)))
        record = {"step": step, "lr": lr_at(config, step)}
        record.update({k: float(v.detach()) for k, v in terms.items() if k != "x_rec"})
        if gan:
            record["disc"] = self._disc_step(step, x, terms["x_rec"])
        self.losses.append((step, record["loss"]))
        self.pending.append(record)
        return None

    def _disc_step(self, step: int, x: torch.Tensor, x_rec: torch.Tensor) -> float:
        config = self.config
        self.disc.requires_grad_(True)
        for group in self.disc_opt.param_groups:
            group["lr"] = lr_at(dataclasses.replace(config, lr=config.disc_lr or config.lr), step)
        loss = discriminator_hinge_loss(self.disc, x, x_rec)
        self.disc_opt.zero_grad(set_to_none=True)
        if bool(torch.isfinite(loss)):
            loss.backward()
            if _clip_ok(self.disc, config.grad_clip):
                self.disc_opt.step()
        self.disc_opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    # ----------------------------------------------------------------------- periodic work
    def flush_log(self) -> None:
        if self.pending:
            with open(self.log_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.pending)
            self.pending.clear()

    def evaluate(self, step: int) -> dict:
        """Held-out PSNR and the latent scaling factor of the EMA autoencoder (which is exported)."""
        config = self.config
        idx = np.random.default_rng([config.seed, 0x5CA1E]).permutation(len(self.data))[:config.scale_n]
        train_images = self.data.batch(np.sort(idx))[0]
        result = {"step": step, "psnr_db": held_out_psnr(self.ema, self.held_out),
                  "eval_n": int(self.held_out.shape[0]),
                  "scaling_factor": latent_scaling_factor(self.ema, train_images, seed=config.seed),
                  "scale_n": int(train_images.shape[0])}
        self.evals = [e for e in self.evals if e.get("step") != step] + [result]
        return result

    def checkpoint(self, step: int) -> Optional[dict]:
        """Evaluate, export and commit a checkpoint of `step`; None (nothing saved) when the
        weights are not finite."""
        if not all(bool(torch.isfinite(p).all()) for p in self.ae.parameters()):
            self.log(f"step {step}: not saving: the weights are not finite")
            return None
        self.flush_log()
        result = self.evaluate(step)
        self.export(step, result)
        self._save(step)
        self._pictures(step)
        return result

    def export(self, step: int, result: dict) -> None:
        """The EMA autoencoder as a diffusers AutoencoderKL folder in the run folder itself (weights
        first, config.json last, each atomically)."""
        self.ema.scaling_factor = result["scaling_factor"]
        extra = {"trained_by": "fastdiff train-autoencoder", "step": step, "data": self.config.data,
                 "image_size": self.config.image_size, "held_out_psnr_db": result["psnr_db"],
                 "held_out_n": result["eval_n"], "loss": self.config.loss, "kl_weight": self.config.kl_weight}
        files = diffusers_folder_files(self.ema, extra=extra)
        atomic_write_bytes(self.out / DIFFUSERS_WEIGHTS, files[DIFFUSERS_WEIGHTS], tag=str(step))
        atomic_write_bytes(self.out / DIFFUSERS_CONFIG, files[DIFFUSERS_CONFIG], tag=str(step))

    def _save(self, step: int) -> None:
        from safetensors.torch import save as st_save

        tensors = {**state_tensors("model", self.ae), **state_tensors("ema", self.ema)}
        opt_tensors, opt_meta = flatten_optimizer(self.opt)
        tensors.update(opt_tensors)
        record = {"format": FORMAT, "step": step, "config": dataclasses.asdict(self.config),
                  "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.ae.config.items()},
                  "optimizer": opt_meta, "rng": rng_state(), "nonfinite_skipped": self.nonfinite,
                  "evals": self.evals, "saved_at": time.time()}
        if self.disc is not None:
            tensors.update(state_tensors("disc", self.disc))
            d_tensors, record["disc_optimizer"] = flatten_optimizer(self.disc_opt)
            tensors.update({"d" + k: v for k, v in d_tensors.items()})
        record["weights"] = name = f"ckpt-{step:08d}.safetensors"
        atomic_write_bytes(self.out / name, st_save(tensors, metadata={"format": FORMAT, "step": str(step)}),
                           tag=str(step))
        previous = self.out / CHECKPOINT_JSON
        try:  # the weights the last committed record names stay until this one is committed
            old = json.loads(previous.read_text()).get("weights")
        except (OSError, ValueError, AttributeError):
            old = None
        atomic_write_bytes(previous, json.dumps(record, indent=1).encode(), tag=str(step))
        keep = {name, old}
        for f in sorted(self.out.glob("ckpt-*.safetensors"))[:-self.config.keep_checkpoints]:
            if f.name not in keep:
                f.unlink(missing_ok=True)

    def _pictures(self, step: int) -> None:
        from fastdiff.image_utils import plot_curve, save_image_grid

        n = min(self.config.recon_n, self.held_out.shape[0])
        originals = self.held_out[:n]
        grid = torch.cat([originals, reconstruct(self.ema, originals)])
        save_image_grid(grid, self.out / "recon" / f"step-{step:08d}.png", nrow=n, scale=2)
        if self.losses:
            plot_curve([s for s, _ in self.losses], [l for _, l in self.losses], self.out / "loss.png",
                       title=f"autoencoder loss ({self.config.loss}, {self.config.data})",
                       smooth=max(1, min(50, len(self.losses) // 20)), log_y=True)


def _clip_ok(net: torch.nn.Module, max_norm: float) -> bool:
    """Clip the gradients to max_norm (0: only check them); whether their norm is finite."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if not grads:
        return True
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return bool(torch.isfinite(norm))


def _merge_resumed(saved: AutoencoderConfig, given: AutoencoderConfig) -> Tuple[AutoencoderConfig, List[str]]:
    """The checkpoint's config with the bookkeeping fields (RESUMABLE_OVERRIDES) taken from `given`;
    and the names of the other fields where `given` differed (the checkpoint's value is kept)."""
    def norm(v):
        return list(v) if isinstance(v, tuple) else v
    kept = [f.name for f in dataclasses.fields(AutoencoderConfig) if f.name not in RESUMABLE_OVERRIDES
            and norm(getattr(saved, f.name)) != norm(getattr(given, f.name))]
    merged = dataclasses.replace(saved, **{k: getattr(given, k) for k in RESUMABLE_OVERRIDES})
    return merged.validate(), kept


def read_record(path: Path) -> dict:
    """An autoencoder run's checkpoint.json, checked: InputError naming the file and the key."""
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, more than a record ever holds")
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable checkpoint record ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        got = record.get("format") if isinstance(record, dict) else None
        raise InputError(f"{path}: not an autoencoder run's checkpoint (format {got!r}, expected {FORMAT!r}); "
                         f"`fastdiff train-autoencoder --resume` continues only a train-autoencoder run")
    try:
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"'step' must be an integer >= 0, got {step!r:.60}")
        for key in ("optimizer", "rng", "config"):
            if not isinstance(record.get(key), dict):
                raise ValueError(f"{key!r} must be a JSON object")
        config_from_record(record["config"])
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: invalid checkpoint record: {e}") from None
    return record


def _weights_path(out: Path, record: dict) -> Path:
    name = record.get("weights")
    if not isinstance(name, str) or "/" in name or "\\" in name or not name.startswith("ckpt-") \
            or not name.endswith(".safetensors"):
        raise InputError(f"{out / CHECKPOINT_JSON}: 'weights' must name a ckpt-<step>.safetensors file in the run "
                         f"folder, got {name!r:.80}")
    path = out / name
    if not path.is_file():
        raise InputError(f"{path}: the weights file checkpoint.json names is missing")
    return path


def train_autoencoder(config: AutoencoderConfig) -> AutoencoderResult:
    """Train an AutoencoderKL on config.data; see AutoencoderConfig and the module docstring. The
    EMA autoencoder, with its scaling factor, is exported into config.out (a diffusers
    AutoencoderKL folder that fastdiff.load_model reads)."""
    run = _AERun(config)
    try:
        return _train(run)
    finally:
        run.release()


def _train(run: _AERun) -> AutoencoderResult:
    outcome = run_steps(run)
    step, status, message = outcome.step, outcome.status, outcome.message
    result = None if status == "nonfinite" else run.checkpoint(step)
    if result is None:
        status = "nonfinite"
        run.flush_log()
        message = (f"stopping at step {step}: {run.nonfinite} steps had non-finite losses or gradients (or the "
                   f"weights are not finite); the last good checkpoint in {run.out} is kept. Lower --lr")
        last = run.evals[-1] if run.evals else {"psnr_db": float("nan"), "scaling_factor": float("nan")}
    else:
        last = result
    return AutoencoderResult(step=step, status=status, message=message, out=str(run.out),
                             psnr_db=float(last["psnr_db"]), scaling_factor=float(last["scaling_factor"]),
                             seconds=outcome.seconds, steps_per_s=outcome.steps_per_s, losses=run.losses)
