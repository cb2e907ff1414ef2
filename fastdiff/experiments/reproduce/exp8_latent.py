"""Experiment 8: pixel vs latent diffusion on 32x32 shapes at equal training wall-clock (Rombach
et al. 2022, the thesis's §4.2).

Compute, each step cached through `Run.cached` (a killed run resumes at the step it was in):
1. the autoencoder (`fastdiff.train.autoencoder`, f = 4), its held-out reconstruction PSNR and
   latent scaling factor; its training time is reported apart (LDM trains it once, for every
   diffusion model that uses it);
2. a pixel U-Net on 32x32 images and a latent U-Net on the autoencoder's 8x8 latents
   (`TrainConfig.autoencoder`), each for the same wall-clock budget of training steps;
3. for each: DDIM samples from the EMA weights, the sampling time per image (the latent one
   includes decoding), and the FID-like against held-out shapes in the feature space of a shapes
   CNN trained at 32x32, with 95% bootstrap intervals; the reconstructions' own FID-like (the
   best a latent model can reach through this autoencoder) and the real-image floor.

The settings live here, not in `run.Settings` (whose fields key every other experiment's cache):
`EXP8_FULL` / `EXP8_QUICK`, chosen by the run's settings name, hashed into the cache keys.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from fastdiff.experiments.reproduce import plots
from fastdiff.experiments.reproduce.report import Section, fmt_ci, table
from fastdiff.experiments.reproduce.run import Run
from fastdiff.experiments.reproduce.stats import bootstrap_fid

TITLE = "Pixel vs latent diffusion at equal training time (32x32 shapes, f = 4)"
CLAIM = ("Rombach et al. (2022, §4.1, Fig. 6-7): diffusion in the latent space of a KL autoencoder with f = 4-8 "
         "reaches sample quality comparable to pixel-space diffusion at a fraction of the training and sampling "
         "compute (pixel-based LDM-1 needs far longer to reach the FID of LDM-4/8). Goal here: latent sampling "
         ">= 4x faster per image than pixel sampling at 32x32 with f = 4, at an FID-like within the pixel model's "
         "interval or a stated, measured gap.")
SPEEDUP_GOAL = 4.0


@dataclass(frozen=True)
class LatentSettings:
    """What experiment 8's numbers depend on (with the run's seed)."""
    image_size: int = 32
    dataset_size: int = 10000
    autoencoder: Tuple[Tuple[str, object], ...] = (
        ("block_out_channels", (32, 32, 64)), ("latent_channels", 8), ("norm_num_groups", 8), ("loss", "l2"),
        ("steps", 2400), ("batch_size", 16), ("lr", 1e-3), ("warmup_steps", 100), ("lr_decay_start", 1400),
        ("ema_rate", 0.999), ("save_every", 400))
    train_minutes: float = 12.0   # wall-clock of training steps, each diffusion model
    pixel_model: Tuple[Tuple[str, object], ...] = (
        ("model_channels", 32), ("channel_mult", (1, 2, 2, 2)), ("num_res_blocks", 1),
        ("attention_resolutions", (8,)), ("num_groups", 8), ("dropout", 0.0))
    latent_model: Tuple[Tuple[str, object], ...] = (
        ("model_channels", 64), ("channel_mult", (1, 2, 2)), ("num_res_blocks", 1),
        ("attention_resolutions", (4,)), ("num_groups", 8), ("dropout", 0.0))
    schedule: str = "cosine"
    prediction: str = "v"
    T: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_rate: float = 0.999
    sample_steps: int = 50
    n_gen: int = 512
    n_ref: int = 2000
    bootstrap: int = 200
    feature_steps: int = 400
    feature_dataset_size: int = 4000

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


EXP8_FULL = LatentSettings()
EXP8_QUICK = LatentSettings(
    dataset_size=400,
    autoencoder=(("block_out_channels", (8, 8, 16)), ("latent_channels", 4), ("norm_num_groups", 4), ("loss", "l1"),
                 ("steps", 20), ("batch_size", 8), ("lr", 2e-3), ("warmup_steps", 5), ("lr_decay_start", None),
                 ("ema_rate", 0.9), ("save_every", 1000)),
    train_minutes=0.05,
    pixel_model=(("model_channels", 8), ("channel_mult", (1, 2)), ("num_res_blocks", 1), ("attention_resolutions", ()),
                 ("num_groups", 8), ("dropout", 0.0)),
    latent_model=(("model_channels", 8), ("channel_mult", (1, 2)), ("num_res_blocks", 1),
                  ("attention_resolutions", ()), ("num_groups", 8), ("dropout", 0.0)),
    T=100, batch_size=16, warmup_steps=5, ema_rate=0.9, sample_steps=10, n_gen=32, n_ref=64, bootstrap=40,
    feature_steps=40, feature_dataset_size=400)


def settings_of(run: Run) -> LatentSettings:
    return EXP8_FULL if run.settings.name == "full" else EXP8_QUICK


def train_config(s: LatentSettings, kind: str, folder: Path, seed: int, progress: bool = False):
    """The TrainConfig of the `kind` ("pixel" or "latent") model, trained into folder/kind (the
    latent one on the autoencoder in folder/autoencoder) for the wall-clock budget."""
    from fastdiff.train import TrainConfig

    model = dict(s.latent_model if kind == "latent" else s.pixel_model)
    return TrainConfig(data="shapes", out=str(folder / kind), steps=10 ** 9, preset="tiny", model=model,
                       batch_size=s.batch_size, seed=seed, image_size=s.image_size,
                       dataset_size=s.dataset_size, lr=s.lr, warmup_steps=s.warmup_steps, ema_rate=s.ema_rate,
                       schedule=s.schedule, T=s.T, prediction=s.prediction, save_every=10 ** 9,
                       sample_at_end=False, sample_steps=min(s.sample_steps, s.T), overwrite=True,
                       max_minutes=s.train_minutes, progress=progress, log_every=10,
                       autoencoder=str(folder / "autoencoder") if kind == "latent" else None)


def untrained_networks(s: LatentSettings, seed: int = 0) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """The pixel U-Net and the latent model (its U-Net + the f = 4 autoencoder) that the experiment
    compares, freshly initialised: the same networks at the same sizes, for timing them
    (bench/bench_latent.py) without training."""
    from fastdiff.models import LatentDiffusionModel
    from fastdiff.train.autoencoder import AutoencoderConfig, build_autoencoder
    from fastdiff.train.config import build_model

    torch.manual_seed(seed)
    ae_config = AutoencoderConfig(data="shapes", out="", image_size=s.image_size, **dict(s.autoencoder))
    autoencoder = build_autoencoder(ae_config, channels=3).eval()
    f = ae_config.downsampling_factor
    pixel = build_model(train_config(s, "pixel", Path(), seed), in_channels=3, num_classes=None).eval()
    unet = build_model(train_config(s, "latent", Path(), seed), in_channels=ae_config.latent_channels,
                       num_classes=None, image_size=s.image_size // f).eval()
    return pixel, LatentDiffusionModel(unet, autoencoder)


class _Exp8:
    """Experiment 8's models and measurements, cached in `run` under keys holding the settings hash."""

    def __init__(self, run: Run):
        self.run, self.s = run, settings_of(run)
        self.folder = run.out / "exp8"
        self.prefix = f"exp8-{self.s.key()}"
        self._features = None

    # -- data and features -------------------------------------------------------------
    def held_out(self, n: int, offset: int = 0) -> torch.Tensor:
        from fastdiff.data import load_dataset

        data = load_dataset("shapes", image_size=self.s.image_size, train=False, seed=0, n=offset + n)
        return data.batch(torch.arange(offset, offset + n))[0]

    def features(self):
        if self._features is None:
            s = self.s
            self._features = self.run.trained_features(self.folder / "features32", s.image_size, s.feature_steps,
                                                       s.feature_dataset_size, "exp8 shapes features")
        return self._features

    def reference(self) -> Tuple[np.ndarray, np.ndarray]:
        """Features of n_ref held-out shapes (the reference) and of n_gen others (the real floor)."""
        s = self.s

        def compute():
            f = self.features()(self.held_out(s.n_ref + s.n_gen)).double().numpy()
            return {"n_ref": s.n_ref}, {"ref": f[:s.n_ref], "floor": f[s.n_ref:]}

        arrays = self.run.cached(f"{self.prefix}-reference", compute)[1]
        return arrays["ref"], arrays["floor"]

    def fid(self, features: np.ndarray, seed_offset: int = 0, other=None) -> Tuple[float, float, float]:
        ref, _ = self.reference()
        return bootstrap_fid(features, ref, self.s.bootstrap, seed=self.run.seed + seed_offset, other=other)

    # -- the autoencoder ------------------------------------------------------------------
    def autoencoder(self) -> dict:
        """Train the autoencoder (resuming a killed run); its held-out PSNR, scaling factor and time."""
        from fastdiff.train.autoencoder import AutoencoderConfig, train_autoencoder

        s, out = self.s, self.folder / "autoencoder"

        def compute():
            self.run.log(f"[experiment 8] training the autoencoder into {out}")
            config = AutoencoderConfig(data="shapes", out=str(out), image_size=s.image_size, seed=self.run.seed,
                                       dataset_size=s.dataset_size, resume=True, progress=self.run.progress,
                                       eval_n=min(256, s.n_ref), **dict(s.autoencoder))
            result = train_autoencoder(config)
            self.run.add_training_time("exp8 autoencoder", result.seconds)
            if result.status != "done":
                raise RuntimeError(f"training the autoencoder stopped: {result.message}")
            return {"psnr_db": result.psnr_db, "scaling_factor": result.scaling_factor, "steps": result.step,
                    "train_seconds": result.seconds, "steps_per_s": result.steps_per_s,
                    "eval_n": config.eval_n, "folder": str(out)}, {}

        return self.run.cached(f"{self.prefix}-autoencoder", compute)[0]

    # -- the two diffusion models -----------------------------------------------------------
    def train_config(self, kind: str):
        return train_config(self.s, kind, self.folder, self.run.seed, self.run.progress)

    def trained(self, kind: str) -> dict:
        """Train `kind` ("pixel" or "latent") for the wall-clock budget (from scratch: a budget is
        one uninterrupted run); its steps, step time and the set-up time outside the budget."""
        from fastdiff.train import train

        def compute():
            if kind == "latent":
                self.autoencoder()
            config = self.train_config(kind)
            self.run.log(f"[experiment 8] training the {kind} model for {self.s.train_minutes:g} min into {config.out}")
            t0 = time.time()
            result = train(config)
            total = time.time() - t0
            self.run.add_training_time(f"exp8 {kind}", result.seconds)
            if result.status not in ("done", "time"):
                raise RuntimeError(f"training the {kind} model stopped: {result.message}")
            return {"kind": kind, "steps": result.step, "train_seconds": result.seconds,
                    "step_seconds": 1.0 / result.steps_per_s, "setup_seconds": max(0.0, total - result.seconds),
                    "final_loss": float(np.mean([l for _, l in result.losses[-50:]])) if result.losses else None}, {}

        return self.run.cached(f"{self.prefix}-train-{kind}", compute)[0]

    def sampled(self, kind: str) -> Tuple[dict, Dict[str, np.ndarray]]:
        """n_gen DDIM samples of `kind`'s EMA model: time per image, features, FID-like."""
        from fastdiff.data import to_uint8
        from fastdiff.sampling import sample
        from fastdiff.train import load_checkpoint

        s = self.s

        def compute():
            self.trained(kind)
            model, _ = load_checkpoint(self.train_config(kind).out, ema=True)
            n_params = sum(p.numel() for p in getattr(model, "unet", model).parameters())
            self.run.log(f"[experiment 8] sampling {s.n_gen} images of the {kind} model (DDIM-{s.sample_steps})")
            t0 = time.time()
            x = sample(model, n=s.n_gen, steps=s.sample_steps, eta=0.0, seed=self.run.seed + 1,
                       progress=self.run.progress)
            seconds = time.time() - t0
            if tuple(x.shape[1:]) != (3, s.image_size, s.image_size):
                raise RuntimeError(f"the {kind} model sampled {tuple(x.shape)}, not 32x32 images")
            feats = self.features()(x.clamp(-1, 1)).double().numpy()
            value, lo, hi = self.fid(feats)
            return ({"kind": kind, "fid": value, "ci": [lo, hi], "sample_seconds": seconds,
                     "seconds_per_image": seconds / s.n_gen, "unet_parameters": n_params, "n_gen": s.n_gen},
                    {"features": feats, "images": to_uint8(x[:64]).numpy()})

        return self.run.cached(f"{self.prefix}-samples-{kind}", compute)

    def reconstructions(self) -> Tuple[dict, Dict[str, np.ndarray]]:
        """The autoencoder's reconstructions of n_gen held-out images: PSNR and FID-like."""
        from fastdiff.data import to_uint8
        from fastdiff.interop import load_model
        from fastdiff.train.autoencoder import psnr, reconstruct

        s = self.s

        def compute():
            self.autoencoder()
            ae, _ = load_model(self.folder / "autoencoder")
            x = self.held_out(s.n_gen, offset=s.n_ref + s.n_gen)  # not the reference, not the floor
            t0 = time.time()
            rec = reconstruct(ae, x)
            seconds = time.time() - t0
            per_image = psnr(rec, x).numpy()
            feats = self.features()(rec).double().numpy()
            value, lo, hi = self.fid(feats)
            return ({"psnr_db": float(per_image.mean()), "fid": value, "ci": [lo, hi],
                     "encode_decode_seconds_per_image": seconds / s.n_gen},
                    {"psnr": per_image, "images": to_uint8(rec[:64]).numpy()})

        return self.run.cached(f"{self.prefix}-reconstructions", compute)


def _ci(cell: dict) -> str:
    return fmt_ci(cell["fid"], *cell["ci"], digits=2)


def _verdict(speedup: float, pixel: dict, latent: dict, diff: Tuple[float, float, float]) -> Tuple[str, str]:
    """(verdict, short verdict) of the goal: speed-up >= 4 and the latent FID-like inside the pixel
    model's interval, or the measured gap stated."""
    fast = speedup >= SPEEDUP_GOAL
    inside = pixel["ci"][0] <= latent["fid"] <= pixel["ci"][1]
    better = latent["fid"] < pixel["ci"][0]
    quality = ("within the pixel model's interval" if inside else "below (better than) the pixel model's interval"
               if better else f"above the pixel model's interval: a measured gap (latent - pixel) of "
               f"{fmt_ci(*diff, digits=2)}")
    goal = fast and (inside or better)
    text = (f"Goal {'met' if goal else 'not met'}: latent sampling is {speedup:.1f}x faster per image than pixel "
            f"sampling ({'>=' if fast else '<'} {SPEEDUP_GOAL:g}x), and its FID-like {_ci(latent)} is {quality} "
            f"({_ci(pixel)}). Rombach et al.'s claim of comparable quality at far lower compute "
            f"{'holds' if goal else 'holds for the compute' if fast else 'does not hold'} at this scale.")
    return text, "goal met" if goal else ("faster, quality gap stated" if fast else "goal not met")


def experiment(run: Run) -> Section:
    exp = _Exp8(run)
    s = exp.s
    ae = exp.autoencoder()
    train = {k: exp.trained(k) for k in ("pixel", "latent")}
    cells, arrays = {}, {}
    for kind in ("pixel", "latent"):
        cells[kind], arrays[kind] = exp.sampled(kind)
    recon, recon_arrays = exp.reconstructions()
    _, floor_features = exp.reference()
    floor = dict(zip(("fid", "lo", "hi"), exp.fid(floor_features, seed_offset=3)))
    floor["ci"] = [floor.pop("lo"), floor.pop("hi")]
    diff = exp.fid(arrays["latent"]["features"], seed_offset=5, other=arrays["pixel"]["features"])
    speedup = cells["pixel"]["seconds_per_image"] / cells["latent"]["seconds_per_image"]
    verdict, short = _verdict(speedup, cells["pixel"], cells["latent"], diff)

    rows = [[kind, f"{cells[kind]['unet_parameters'] / 1e6:.2f}M", str(train[kind]["steps"]),
             f"{1e3 * train[kind]['step_seconds']:.0f}", f"{1e3 * cells[kind]['seconds_per_image']:.1f}",
             _ci(cells[kind])] for kind in ("pixel", "latent")]
    rows.append(["autoencoder reconstructions (the latent model's floor)", "", "", "",
                 f"{1e3 * recon['encode_decode_seconds_per_image']:.1f} (encode + decode)", _ci(recon)])
    rows.append(["real held-out images (floor)", "", "", "", "", _ci(floor)])
    fig = plots.latent_vs_pixel(run.out, cells, recon, floor, speedup, "exp8_latent.png")
    strip = plots.sample_strip(run.out, [("pixel", arrays["pixel"]["images"]), ("latent", arrays["latent"]["images"]),
                                         ("AE recon.", recon_arrays["images"])], "exp8_samples.png")
    ae_widths = dict(s.autoencoder)["block_out_channels"]
    settings = [
        f"{s.image_size}x{s.image_size} shapes ({s.dataset_size} training images); both models: {s.schedule} schedule, "
        f"{s.prediction}-prediction, T = {s.T}, AdamW batch {s.batch_size}, lr {s.lr:g} (warm-up {s.warmup_steps}), "
        f"EMA {s.ema_rate}, trained for the same {s.train_minutes:g} min of training steps (the latent model's "
        f"one-time encoding of the training set, {train['latent']['setup_seconds']:.0f}s, is outside that budget)",
        f"pixel U-Net {dict(s.pixel_model)}; latent U-Net {dict(s.latent_model)} on "
        f"{dict(s.autoencoder)['latent_channels']}x{s.image_size // 4}x{s.image_size // 4} latents",
        f"autoencoder (f = 4, widths {tuple(ae_widths)}, {dict(s.autoencoder)['latent_channels']} latent channels, "
        f"{ae['steps']} steps in {ae['train_seconds'] / 60:.1f} min, trained once and not counted in the budget): "
        f"held-out PSNR {ae['psnr_db']:.2f} dB (n = {ae['eval_n']}), scaling factor {ae['scaling_factor']:.4g}",
        f"sampling: DDIM-{s.sample_steps} (eta 0) of {s.n_gen} images in one batch, same seed for both; the latent "
        f"time includes decoding; FID-like in the features of a shapes CNN trained at {s.image_size}x{s.image_size}, "
        f"against {s.n_ref} held-out shapes, 95% bootstrap CI"]
    return Section(
        8, TITLE, CLAIM, settings,
        [table(["model", "U-Net params", "train steps", "ms / train step", "ms / sampled image", "FID-like"], rows)],
        [(fig, "Sampling time per image and FID-like (95% CI) of the pixel and latent models, with the "
               "autoencoder's reconstructions and real images as floors."),
         (strip, "Samples of each model (same seed) and the autoencoder's reconstructions of held-out shapes.")],
        verdict, short,
        notes=[f"Reconstruction PSNR of the autoencoder on {s.n_gen} further held-out images: "
               f"{recon['psnr_db']:.2f} dB. The FID-like of the reconstructions bounds what any latent model "
               f"through this autoencoder can reach."],
        numbers={"autoencoder": ae, "train": train, "samples": cells, "reconstructions": recon, "real_floor": floor,
                 "latent_minus_pixel_fid": list(diff), "speedup": speedup, "goal_met": short == "goal met"})
