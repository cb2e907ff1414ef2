"""The run: the settings the numbers depend on (`Settings`, `FULL`, `QUICK`), the trained
models (`MODELS`), and `Run`, the output folder with its caches.

Everything expensive (the feature network, every trained model, every bits/dim evaluation
and every sample set's features) goes through `Run.cached(key, compute)`: read from
cache/KEY.json (+ KEY.npz), or computed, timed and written atomically, so a rerun resumes
where a killed one stopped. The cache keys are part of the on-disk format: keep them."""
from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fastdiff.io import atomic_write_bytes
from fastdiff.experiments.reproduce.stats import bootstrap_fid, t_interval

#: The DDIM table's "eta" of the ancestral sampler with sigma^2 = beta (Song et al.'s sigma-hat).
SIGMA_HAT = "sigma_hat"

# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Everything the numbers depend on (with the seed). `quick` shrinks every axis."""
    name: str
    image_size: int = 16
    T: int = 1000
    model: Tuple[Tuple[str, object], ...] = (("model_channels", 16), ("channel_mult", (1, 2, 2)),
                                              ("num_res_blocks", 1), ("attention_resolutions", (8,)),
                                              ("num_groups", 8), ("dropout", 0.0))
    train_steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_rate: float = 0.999
    dataset_size: int = 10000
    feature_steps: int = 400
    feature_dataset_size: int = 4000
    bpd_images: int = 100
    n_gen: int = 128
    n_ref: int = 2000
    bootstrap: int = 200
    ddim_etas: Tuple = (0.0, 0.2, 0.5, 1.0, SIGMA_HAT)
    ddim_steps: Tuple[int, ...] = (10, 20, 50, 100, 1000)
    respace_steps: Tuple[int, ...] = (10, 25, 50, 100, 250)
    oracle_T: int = 1000
    oracle_steps: Tuple[int, ...] = (2, 5, 10, 20, 50, 100, 200, 500, 1000)
    oracle_n: int = 4000
    oracle_seeds: int = 5
    oracle_bandwidth: float = 0.2

    @property
    def model_kwargs(self) -> dict:
        return dict(self.model)

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


FULL = Settings(name="full")
QUICK = Settings(name="quick", T=100,
                 model=(("model_channels", 8), ("channel_mult", (1, 2)), ("num_res_blocks", 1),
                        ("attention_resolutions", ()), ("num_groups", 8), ("dropout", 0.0)),
                 train_steps=30, batch_size=16, warmup_steps=5, ema_rate=0.9, dataset_size=400,
                 feature_steps=40, feature_dataset_size=400, bpd_images=8, n_gen=32, n_ref=64, bootstrap=40,
                 ddim_steps=(2, 5, 10, 20, 100), respace_steps=(2, 5, 10, 25, 50), oracle_T=100,
                 oracle_steps=(2, 5, 10, 50, 100), oracle_n=400, oracle_seeds=2)


def settings_for(quick: bool) -> Settings:
    return QUICK if quick else FULL


#: The four trained models: (noise schedule, loss, variance, t-sampler).
MODELS = {
    "linear-simple": dict(schedule="linear", loss="simple", variance="fixed_small", t_sampler="uniform"),
    "cosine-simple": dict(schedule="cosine", loss="simple", variance="fixed_small", t_sampler="uniform"),
    "cosine-hybrid": dict(schedule="cosine", loss="hybrid", variance="learned_range", t_sampler="uniform"),
    "cosine-vlb": dict(schedule="cosine", loss="vlb", variance="learned_range", t_sampler="importance"),
}



class Run:
    """The output folder, settings and seed of one reproduction, with its caches."""

    def __init__(self, out, settings: Settings, seed: int = 0, progress: bool = True, log=None):
        self.out = Path(out)
        self.settings = settings
        self.seed = int(seed)
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.cache = self.out / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self._models: Dict[str, torch.nn.Module] = {}
        self._features = None
        self._heldout = None
        # seconds spent in this invocation on results that were not cached yet; training runs
        # inside the computation of the first result that needs the model, so it is included
        self.new_seconds = 0.0
        self._check_settings()

    def _check_settings(self) -> None:
        path = self.cache / "settings.json"
        mine = {"settings": self.settings.to_json(), "seed": self.seed}
        if path.exists():
            theirs = json.loads(path.read_text())
            # a setting added to `Settings` after this folder was started cannot have changed
            # the results already cached: accept it and record it
            added = {k: v for k, v in mine["settings"].items() if k not in theirs.get("settings", {})}
            if added and theirs.get("seed") == self.seed:
                theirs = {"settings": dict(theirs["settings"], **added), "seed": theirs["seed"]}
                if theirs == mine:
                    atomic_write_bytes(path, json.dumps(mine, indent=1).encode())
            if theirs != mine:
                raise ValueError(f"--out {self.out}: it holds a reproduction with other settings "
                                 f"({theirs['settings']['name']}, seed {theirs['seed']}) than this one "
                                 f"({self.settings.name}, seed {self.seed}); use another --out or delete {self.cache}")
        else:
            atomic_write_bytes(path, json.dumps(mine, indent=1).encode())

    # -- cached results ------------------------------------------------------------
    def cached(self, key: str, compute: Callable[[], Tuple[dict, Dict[str, np.ndarray]]]):
        """(record, arrays) for `key`: read from the cache, or computed, timed and saved
        atomically (arrays first, the JSON record last: it is the commit)."""
        rec_path, arr_path = self.cache / f"{key}.json", self.cache / f"{key}.npz"
        if rec_path.exists():
            record = json.loads(rec_path.read_text())
            arrays = dict(np.load(arr_path)) if record.get("has_arrays") else {}
            return record, arrays
        t0 = time.time()
        record, arrays = compute()
        seconds = time.time() - t0
        self.new_seconds += seconds
        record = dict(record, seconds=round(seconds, 2), has_arrays=bool(arrays))
        if arrays:
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            atomic_write_bytes(arr_path, buf.getvalue())
        atomic_write_bytes(rec_path, json.dumps(record, indent=1).encode())
        return record, arrays

    def compute_seconds(self) -> float:
        """Seconds spent computing every cached result (also in earlier, resumed runs)."""
        total = 0.0
        for p in self.cache.glob("*.json"):
            try:
                record = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and isinstance(record.get("seconds"), (int, float)):
                total += float(record["seconds"])
        return total

    # -- data, features, models ----------------------------------------------------
    def heldout(self):
        """Held-out shapes: [0, n_ref) the FID reference, then n_gen for the real-data floor,
        then bpd_images for bits/dim."""
        if self._heldout is None:
            from fastdiff.data import load_dataset

            s = self.settings
            n = s.n_ref + s.n_gen + s.bpd_images
            ds = load_dataset("shapes", image_size=s.image_size, train=False, seed=0, n=n)
            x, _ = ds.batch(range(n))
            self._heldout = x
        return self._heldout

    def features(self):
        if self._features is None:
            s = self.settings
            self._features = self.trained_features(self.out / "features", s.image_size, s.feature_steps,
                                                   s.feature_dataset_size, "shapes features")
        return self._features

    def trained_features(self, folder: Path, image_size: int, steps: int, dataset_size: int, name: str):
        """The shapes feature network in `folder`, trained there first (its time recorded under
        `name`) unless an earlier invocation did."""
        from fastdiff.metrics.features import SHAPES_RECORD, load_shapes_features
        from fastdiff.train.features import train_shapes_features

        if not (folder / SHAPES_RECORD).exists():
            self.log(f"training the {image_size}x{image_size} shapes feature network ({steps} steps) into {folder}")
            t0 = time.time()
            train_shapes_features(folder, steps=steps, seed=self.seed, image_size=image_size,
                                  dataset_size=dataset_size, progress=self.progress)
            self.log(f"  done in {time.time() - t0:.0f}s")
            self.add_training_time(name, time.time() - t0)
        return load_shapes_features(folder)

    def reference_features(self) -> Tuple[np.ndarray, np.ndarray]:
        """(reference, floor): features of n_ref held-out shapes, and of n_gen other ones."""
        s = self.settings

        def compute():
            x = self.heldout()
            f = self.features()(x[: s.n_ref + s.n_gen]).double().numpy()
            return {"n_ref": s.n_ref, "n_floor": s.n_gen}, {"ref": f[: s.n_ref], "floor": f[s.n_ref:]}

        _, arrays = self.cached("reference-features", compute)
        return arrays["ref"], arrays["floor"]

    def train_config(self, name: str):
        from fastdiff.train import TrainConfig

        s = self.settings
        spec = MODELS[name]
        return TrainConfig(data="shapes", out=str(self.out / "models" / name), steps=s.train_steps, preset="tiny",
                           batch_size=s.batch_size, seed=self.seed, image_size=s.image_size,
                           dataset_size=s.dataset_size, lr=s.lr, warmup_steps=s.warmup_steps, ema_rate=s.ema_rate,
                           schedule=spec["schedule"], T=s.T, prediction="eps", variance=spec["variance"],
                           loss=spec["loss"], t_sampler=spec["t_sampler"], model=s.model_kwargs,
                           save_every=max(1, min(250, s.train_steps)), sample_at_end=False,
                           sample_steps=min(50, s.T), resume=True, progress=self.progress, log_every=10)

    def model(self, name: str) -> torch.nn.Module:
        """The EMA weights of a trained model, training (or resuming) it first if needed."""
        if name not in self._models:
            from fastdiff.train import load_checkpoint, read_checkpoint_record, train

            config = self.train_config(name)
            record = read_checkpoint_record(config.out, missing_ok=True)
            if record is None or record["step"] < config.steps:
                at = f" (resuming at step {record['step']})" if record else ""
                self.log(f"training {name} for {config.steps} steps{at} into {config.out}")
                result = train(config)
                if result.status != "done":
                    raise RuntimeError(f"training {name} stopped: {result.message}")
                self.log(f"  {name}: {result.step} steps at {result.steps_per_s:.2f} steps/s")
                self.add_training_time(name, result.seconds)
            self._models[name] = load_checkpoint(config.out, ema=True)[0]
        return self._models[name]

    def training_losses(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        steps, losses = [], []
        path = Path(self.train_config(name).out) / "log.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            steps.append(rec["step"])
            losses.append(rec["loss"])
        return np.asarray(steps), np.asarray(losses)

    def add_training_time(self, name: str, seconds: float) -> None:
        path = self.cache / "training-times.json"
        times = json.loads(path.read_text()) if path.exists() else {}
        times[name] = times.get(name, 0.0) + seconds
        atomic_write_bytes(path, json.dumps(times, indent=1).encode())

    def record_invocation(self, command: str, wall_seconds: float, threads: int, only: Sequence[int]) -> None:
        """Append this invocation to cache/invocations.json (the report lists them)."""
        path = self.cache / "invocations.json"
        log = json.loads(path.read_text()) if path.exists() else []
        log.append({"command": command, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "wall_minutes": round(wall_seconds / 60, 2), "threads": threads, "experiments": list(only)})
        atomic_write_bytes(path, json.dumps(log, indent=1).encode())

    def cache_span(self) -> Tuple[float, float]:
        """(first, last) modification times of the cache's records: settings.json is written
        when a folder's first run starts, each result when it is done."""
        times = [p.stat().st_mtime for p in self.cache.glob("*.json")
                 if p.name not in ("invocations.json", "training-times.json")]
        return min(times), max(times)

    def invocations(self) -> List[dict]:
        path = self.cache / "invocations.json"
        return json.loads(path.read_text()) if path.exists() else []

    def training_seconds(self) -> float:
        path = self.cache / "training-times.json"
        return sum(json.loads(path.read_text()).values()) if path.exists() else 0.0

    # -- measurements ----------------------------------------------------------------
    def bpd(self, name: str) -> Tuple[dict, Dict[str, np.ndarray]]:
        """Bits/dim (full T-step bound) of model `name` on the held-out images; every model
        sees the same images and the same noise draws, so differences are paired."""
        s = self.settings

        def compute():
            model = self.model(name)
            x = self.heldout()[s.n_ref + s.n_gen:]
            gen = torch.Generator().manual_seed(self.seed + 17)
            self.log(f"bits/dim of {name} on {len(x)} held-out images ({s.T} model calls per batch)")
            totals, vb, prior = [], [], []
            for start in range(0, len(x), 50):
                res = model.diffusion.nll_bpd(model, x[start:start + 50], generator=gen, progress=self.progress)
                totals.append(res["total_bpd"])
                vb.append(res["vb"])
                prior.append(res["prior_bpd"])
            totals = torch.cat(totals).double().numpy()
            mean, lo, hi = t_interval(totals)
            return ({"model": name, "bpd": mean, "ci": [lo, hi], "n": len(totals)},
                    {"total_bpd": totals, "vb_mean": torch.cat(vb).mean(0).double().numpy(),
                     "prior": torch.cat(prior).double().numpy()})

        return self.cached(f"bpd-{name}", compute)

    def samples_fid(self, name: str, sampler: str, steps: int, eta: float = 0.0,
                    variance: Optional[str] = None, rtol: Optional[float] = None) -> Tuple[dict, Dict[str, np.ndarray]]:
        """FID-like of n_gen samples of model `name` (sampler "ddim" with eta, "ddpm" with the
        model's variance or `variance`, any other sampler of `fastdiff.sample`; "ode" with its
        tolerance `rtol`, None: sample()'s default), with a bootstrap interval. All sample sets
        start from the same initial noise (same seed). The record holds "nfe", the network
        evaluations `sample` counted (for "ode": as the adaptive solver used them)."""
        from fastdiff.data import to_uint8
        from fastdiff.diffusion import GaussianDiffusion
        from fastdiff.sampling import sample

        s = self.settings
        tag = f"eta{eta:g}" if sampler == "ddim" else (variance or "model")
        key = f"fid-{name}-{sampler}-{tag}-S{steps}" + (f"-rtol{rtol:g}" if rtol is not None else "")

        def compute():
            model = self.model(name)
            diffusion = model.diffusion
            if variance is not None:
                diffusion = GaussianDiffusion(diffusion.schedule, prediction=diffusion.prediction, variance=variance)
            t0 = time.time()
            stats: dict = {}
            x = sample(model, n=s.n_gen, steps=steps, eta=eta, sampler=sampler, diffusion=diffusion,
                       seed=self.seed + 1, progress=self.progress, stats=stats,
                       **({"rtol": rtol} if rtol is not None else {}))
            sample_seconds = time.time() - t0
            gen = self.features()(x).double().numpy()
            ref, _ = self.reference_features()
            value, lo, hi = bootstrap_fid(gen, ref, s.bootstrap, seed=self.seed)
            return ({"model": name, "sampler": sampler, "steps": steps, "eta": eta, "variance": variance,
                     "rtol": rtol, "nfe": stats.get("nfe"), "fid": value, "ci": [lo, hi], "n_gen": s.n_gen, "n_ref": s.n_ref,
                     "sample_seconds": round(sample_seconds, 2)},
                    {"features": gen, "images": to_uint8(x[:64]).numpy()})

        return self.cached(key, compute)

    def real_floor(self) -> dict:
        """FID-like of n_gen held-out real images against the reference: what a perfect model
        would score at this sample size."""
        s = self.settings

        def compute():
            ref, floor = self.reference_features()
            value, lo, hi = bootstrap_fid(floor, ref, s.bootstrap, seed=self.seed)
            return {"fid": value, "ci": [lo, hi], "n_gen": s.n_gen, "n_ref": s.n_ref}, {}

        return self.cached("fid-real-floor", compute)[0]

    def fid_difference(self, a: Tuple, b: Tuple) -> Tuple[float, float, float]:
        """FID(a) - FID(b) with a paired bootstrap interval; a, b are samples_fid arguments."""
        fa = self.samples_fid(*a)[1]["features"]
        fb = self.samples_fid(*b)[1]["features"]
        ref, _ = self.reference_features()
        return bootstrap_fid(fa, ref, self.settings.bootstrap, seed=self.seed + 5, other=fb)
