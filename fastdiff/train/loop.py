"""The training loop: AdamW with warm-up and step decay, gradient clipping, EMA, bf16 autocast,
every loss and t-sampler of GaussianDiffusion, atomic checkpoints with exact resume, and DDP
under torchrun.

Exactness: everything random in step s (the batch, t, the noise, label dropout, dropout
masks) is drawn from generators seeded by (seed, step, rank), and a checkpoint
(fastdiff.train.checkpoint) holds the model, EMA, optimizer and t-sampler state bit for bit.

`train(config)` reads as the list of what a run does: `_Run` sets it up (fresh or resumed),
then each iteration is `run.optimize(step)` (one optimisation step), `run.record(...)`,
and the periodic `run.checkpoint` / `run.samples`, until the steps, the clock or the
non-finite budget end it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from fastdiff.data import StepSampler, load_dataset
from fastdiff.errors import InputError, UserError
from fastdiff.image_utils import NonFiniteImagesError
from fastdiff.io import RunLock, atomic_write_bytes, check_output_dir, remove_stale_temp_files
from fastdiff.models.latent import LatentDiffusionModel
from fastdiff.models.unet import UNet
from fastdiff.train import distributed
from fastdiff.train.checkpoint import (CHECKPOINT_JSON, check_tensor_shapes, file_tensor_shapes, load_tensors,
                                       read_checkpoint_record, save_checkpoint, set_rng_state, state_tensors,
                                       unflatten_optimizer, weights_path)
from fastdiff.train.config import (TrainConfig, TrainResult, build_continuous_loss, build_model, config_from_dict,
                                   ema_rate_at, lr_at, merge_resumed, step_seed)
from fastdiff.train.ema import ema_update
from fastdiff.train.latent import prepare_latents
from fastdiff.train.steps import budget_spent, run_steps, step_progress_bar

# An exploding loss is judged against the median of the last [1] accepted losses, once there
# are at least [0] of them.
DIVERGENCE_HISTORY = (5, 50)
# A checkpoint is not written when the weights' norm grew more than this many times since the
# last one (or the start): no sane run does that between two saves; a diverged one does.
WEIGHT_GROWTH = 100.0


def _read_log(path: Path, before_step: int) -> List[Tuple[int, float]]:
    """(step, loss) of the log's steps before `before_step`; lines that are not such a record
    (cut by a kill, edited) are skipped."""
    out = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if not isinstance(rec, dict):
                continue
            step, loss = rec.get("step"), rec.get("loss")
            if (isinstance(step, int) and not isinstance(step, bool) and 0 <= step < before_step
                    and isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss)):
                out.append((step, float(loss)))
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


class _Run:
    """One training run between steps: config, data, model, EMA, optimizer and the log."""

    def __init__(self, config: TrainConfig):
        config.validate()
        self.out = Path(config.out)
        self.rank, self.world, self.device = distributed.setup(config.device)
        self.lock = self._lock()
        try:
            self._setup(config)
        except BaseException:
            self.release()
            raise

    def _lock(self) -> Optional[RunLock]:
        """Rank 0 takes the run folder's lock (one writer per folder); every rank learns
        whether it got it, so that all stop together when another process holds it."""
        lock, error = None, None
        if self.rank == 0:
            try:
                check_output_dir(self.out)
                lock = RunLock(self.out).acquire()
            except UserError as e:
                error = e
        if distributed.from_rank0(error is not None, self.world, self.device):
            raise error if error is not None else UserError(f"{self.out}: rank 0 could not take the run folder")
        return lock

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _setup(self, config: TrainConfig) -> None:
        self.start_step, record = 0, None
        if config.resume:
            record = read_checkpoint_record(self.out, missing_ok=True)
            if record is None:
                self.log(f"--resume: no checkpoint in {self.out}; starting from scratch")
            else:
                config, kept = merge_resumed(config_from_dict(record["config"], strict=True), config)
                if kept:
                    self.log(f"resuming with the checkpoint's settings for {', '.join(kept)}")
                self.start_step = record["step"]
        elif (self.out / CHECKPOINT_JSON).exists():
            if not config.overwrite:
                raise UserError(f"--out {self.out} holds a training run ({CHECKPOINT_JSON}); --resume continues "
                                f"it, --overwrite starts a new run over it (its checkpoints are replaced), or "
                                f"choose another --out")
            self.log(f"--overwrite: starting a new run over the one in {self.out}")
        self.config = config
        self.dataset = load_dataset(config.data, image_size=config.image_size, train=True, seed=0,
                                    n=config.dataset_size)
        # --autoencoder: the training set as cached latent posteriors, and the run's copy of the autoencoder
        self.autoencoder, self.latents = prepare_latents(config, self.dataset, self.out, record is not None, self.rank,
                                                         self.device, log=self.log)
        self._build(record)
        self.sampler = StepSampler(len(self.dataset), config.batch_size, seed=config.seed, rank=self.rank,
                                   world=self.world)
        self.saved_norm = self.weights_norm()  # of the weights the run starts from
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.update = None  # --compile: the compiled forward/backward and optimizer step
        if config.compile:
            self._compile(config.compile)
        self._open_log()

    def _compile(self, backend: str) -> None:
        """The compiled training step: the network's forward and backward (torch.compile; fullgraph
        on one process, DDP's graph breaks at its buckets otherwise) and CompiledUpdate for
        clipping + AdamW + EMA on the same optimizer state (checkpoints unchanged)."""
        from fastdiff.optimization import CompiledUpdate

        self.net = torch.compile(self.net, backend=backend, fullgraph=self.world == 1, dynamic=False)
        self.update = CompiledUpdate(self.opt, grad_clip=self.config.grad_clip, ema=(self.ema, self.model),
                                     backend=backend)
        self.log(f"--compile {backend}: forward + backward and clip + AdamW + EMA compiled"
                 + (" (the first steps compile: minutes on a CPU)" if backend == "inductor" else ""))

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)

    def _build(self, record: Optional[dict]) -> None:
        """Model, EMA and optimizer, from scratch or from the checkpoint `record` names."""
        config = self.config
        torch.manual_seed(config.seed)
        channels, size = self.dataset.shape[0], None
        if self.latents is not None:  # the U-Net of latents: latent channels, image_size / f
            channels, size = self.latents.shape[0], self.latents.shape[-1]
        self.model = build_model(config, channels, self.dataset.num_classes, image_size=size).to(self.device)
        self.diffusion = self.model.diffusion
        self.continuous_loss = build_continuous_loss(config, self.diffusion)  # --sde (None: discrete t)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.ema = self.ema.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                     foreach=True)
        self.nonfinite = 0
        if record is None:
            return
        shapes, _ = file_tensor_shapes(weights_path(self.out, record))
        for prefix in ("model.", "ema."):
            check_tensor_shapes(self.model, shapes, self.out / record["weights"], prefix=prefix)
        tensors = load_tensors(self.out, record)
        try:
            self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
            self.opt.load_state_dict(unflatten_optimizer(tensors, record["optimizer"]))
            self.diffusion.t_sampler.load_state_dict(
                {k: torch.tensor(v) for k, v in record["t_sampler"]["state"].items()})
            set_rng_state(record["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise InputError(f"{self.out / CHECKPOINT_JSON}: cannot restore the run from it "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
        self.nonfinite = record.get("nonfinite_skipped", 0)
        self.log(f"resumed from {self.out / CHECKPOINT_JSON} at step {self.start_step}")

    def _open_log(self) -> None:
        self.log_path = self.out / "log.jsonl"
        self.losses: List[Tuple[int, float]] = []
        self.pending_log: List[dict] = []
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        # temp files of a save of this run that was killed (we hold the lock: no other writer's)
        remove_stale_temp_files(self.out, (CHECKPOINT_JSON, "log.jsonl", "ckpt-*.safetensors"))
        self.losses = _read_log(self.log_path, self.start_step)
        atomic_write_bytes(self.log_path, "".join(json.dumps({"step": s, "loss": l}) + "\n"
                                                  for s, l in self.losses).encode())

    # ----------------------------------------------------------------------- one step
    def _model_fn(self, x_t, t, **kw):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            out = self.net(x_t, t, **kw)
        return out.float()

    def _batch(self, step: int):
        """(x0, t, importance weights, noise, model kwargs) of `step`, from its own generators.
        t, noise and label dropout are drawn for the global batch (all ranks) and sliced, so W
        ranks of batch B see what one process of batch W B sees (dropout masks stay per rank)."""
        config, device, rank = self.config, self.device, self.rank
        indices = self.sampler.indices(step)
        if self.latents is None:
            x, y = self.dataset.batch(indices)
        else:  # a posterior sample of each image's latents, from the step's own generator
            gen_z = torch.Generator().manual_seed(step_seed(config.seed, step, 0, 4))
            x, y = self.latents.batch(indices, gen_z, rank, self.world)
        x = x.to(device, non_blocking=True)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        n, mine = x.shape[0] * self.world, slice(rank * x.shape[0], (rank + 1) * x.shape[0])
        gen = torch.Generator().manual_seed(step_seed(config.seed, step, 0, 1))
        dev_gen = gen if device.type == "cpu" else \
            torch.Generator(device).manual_seed(step_seed(config.seed, step, 0, 2))
        torch.manual_seed(step_seed(config.seed, step, rank, 3))  # dropout masks
        if self.continuous_loss is not None:
            t, weights = self.continuous_loss.sample_t(n, gen)[mine], torch.ones(x.shape[0], device=device)
        else:
            t, weights = (v[mine] for v in self.diffusion.t_sampler.sample(n, device, gen))
        noise = torch.randn((n, *x.shape[1:]), generator=dev_gen, device=device, dtype=x.dtype)[mine]
        kwargs = {}
        if config.class_cond:
            drop = torch.rand(n, generator=gen)[mine] < config.p_uncond
            y = torch.where(drop, torch.full_like(y, self.model.num_classes), y)
            kwargs["y"] = y.to(device)
        return x, t, weights, noise, kwargs

    def explosion(self, loss: float) -> Optional[str]:
        """What is wrong with a finite batch loss that is `divergence_factor` times the median
        of the last accepted ones (a finite blow-up: lr too high), else None. Decided from the
        logged history only, so a resumed run decides as an uninterrupted one."""
        factor = self.config.divergence_factor
        if not factor or len(self.losses) < DIVERGENCE_HISTORY[0]:
            return None
        ref = float(np.median([l for _, l in self.losses[-DIVERGENCE_HISTORY[1]:]]))
        if ref > 0 and loss > factor * ref:
            return (f"exploding loss {loss:.4g} ({loss / ref:.3g} times the median {ref:.4g} of the last "
                    f"{min(len(self.losses), DIVERGENCE_HISTORY[1])} steps: the run is diverging)")
        return None

    def weights_norm(self) -> float:
        with torch.no_grad():
            return float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.detach().float()) for p in self.model.parameters()])))

    def optimize(self, step: int) -> Optional[str]:
        """One optimisation step. Returns None when it was applied, else what went wrong
        ("loss" or "gradient" not finite, or an exploding loss; the step is skipped on every rank)."""
        config = self.config
        for g in self.opt.param_groups:
            g["lr"] = lr_at(config, step)
        x, t, weights, noise, kwargs = self._batch(step)
        losses = self.continuous_loss or self.diffusion.training_losses
        terms = losses(self._model_fn, x, t=t, noise=noise, model_kwargs=kwargs)
        loss = (terms["loss"] * weights).mean()
        # One collective decides for every rank: skip the step if any rank's loss is not
        # finite (the backward's all-reduce must run on all ranks or none).
        flag = torch.stack([loss.detach().float().nan_to_num(0.0, 0.0, 0.0),
                            (~torch.isfinite(loss.detach())).float()])
        if self.world > 1:
            torch.distributed.all_reduce(flag)
            flag[0] /= self.world
        if flag[1].item() != 0:
            return "loss"
        exploded = self.explosion(flag[0].item())
        if exploded:
            return exploded
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_ok = True
        if self.update is not None:  # --compile
            grad_ok = self.update(lr_at(config, step), ema_rate_at(config, step))
        elif config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            grad_ok = bool(torch.isfinite(norm))
        if grad_ok and self.update is None:
            self.opt.step()
            ema_update(self.ema, self.model, ema_rate_at(config, step))
        self.opt.zero_grad(set_to_none=True)
        if not grad_ok:
            return "gradient"
        if self.continuous_loss is None:  # (no t-sampler in continuous time)
            # every rank's t-sampler sees every rank's losses: they stay equal
            vb = distributed.all_gather_cat(terms["vb"].detach().float(), self.world)
            tt = distributed.all_gather_cat(t, self.world)
            self.diffusion.t_sampler.update(tt.cpu(), vb.cpu())
        value = flag[0].item()
        self.losses.append((step, value))
        self.pending_log.append({"step": step, "loss": value, "lr": lr_at(config, step)})
        return None

    # ----------------------------------------------------------------------- periodic work
    def flush_log(self) -> None:
        if self.rank == 0 and self.pending_log:
            with open(self.log_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.pending_log)
            self.pending_log.clear()

    def checkpoint(self, step: int) -> bool:
        """Commit a checkpoint of `step`; False (nothing saved) when the weights are not finite."""
        from fastdiff.image_utils import plot_curve

        config = self.config
        # An update that blew the weights up can still give a finite loss (lr 1e30: weights of
        # 1e30): such weights must never replace the last good record.
        norm = self.weights_norm()
        bad = not math.isfinite(norm) or (self.saved_norm > 0 and norm > WEIGHT_GROWTH * self.saved_norm)
        if distributed.from_rank0(bad, self.world, self.device):
            self.log(f"step {step}: not saving the weights: their norm {norm:.4g} is not finite or grew more "
                     f"than {WEIGHT_GROWTH:g} times since the last checkpoint ({self.saved_norm:.4g})")
            return False
        if self.rank == 0:
            self.flush_log()
            save_checkpoint(self.out, step, config, self.model, self.ema, self.opt, self.diffusion, self.sampler,
                            self.nonfinite)
            plot_curve([s for s, _ in self.losses], [l for _, l in self.losses], self.out / "loss.png",
                       title=f"training loss ({config.loss}, {config.preset}, {config.data})",
                       smooth=max(1, min(50, len(self.losses) // 20)), log_y=True)
        self.saved_norm = norm
        distributed.barrier(self.world)
        return True

    def sampling_model(self):
        """The EMA network as it is sampled: joined with the autoencoder for a latent run."""
        if self.autoencoder is None:
            return self.ema
        return LatentDiffusionModel(self.ema, self.autoencoder)

    def samples(self, step: int) -> None:
        if self.rank == 0:
            config = self.config
            try:
                write_samples(self.sampling_model(), self.out / "samples" / f"step-{step:08d}.png", config.sample_n,
                              config.sample_steps, seed=config.seed, guidance_scale=config.resolved_guidance_scale)
            except NonFiniteImagesError as e:
                self.log(f"step {step}: no sample grid written: {e}")

    def progress_bar(self):
        if not (self.config.progress and self.rank == 0):
            return None
        return step_progress_bar(self.config, self.start_step, "train")

    def after_step(self, step: int) -> None:
        if self.config.sample_every and step % self.config.sample_every == 0:
            self.samples(step)

    def out_of_time(self, t_start: float) -> bool:
        # rank 0's clock decides, so every rank stops at the same step
        return distributed.from_rank0(budget_spent(self.config, t_start), self.world, self.device)


def train(config: TrainConfig) -> TrainResult:
    """Train a UNet on config.data; see TrainConfig. Returns a TrainResult (status "done",
    "time" when max_minutes ran out, "nonfinite" when too many non-finite losses were skipped)."""
    run = _Run(config)
    try:
        return _train(run)
    finally:
        run.release()


def _stop_message(run: _Run, step: int) -> str:
    config = run.config
    kept = read_checkpoint_record(run.out, missing_ok=True)
    where = (f"the last good checkpoint (step {kept['step']}) is kept in {run.out / CHECKPOINT_JSON}; "
             f"nothing after it was saved" if kept is not None else
             f"no checkpoint was saved (the run went wrong before its first save, at step {config.save_every})")
    return (f"stopping at step {step}: {run.nonfinite} steps had non-finite or exploding losses/gradients "
            f"(more than max_nonfinite={config.max_nonfinite}); {where}. Check the data and lower the "
            f"learning rate.")


def _train(run: _Run) -> TrainResult:
    config = run.config  # a resumed run continues with its recorded settings
    run.model.train()
    outcome = run_steps(run)
    step, status, message = outcome.step, outcome.status, outcome.message
    elapsed, steps_per_s = outcome.seconds, outcome.steps_per_s
    if status == "nonfinite" or not run.checkpoint(step):
        # the weights since the last checkpoint are not trusted: that record stays the run's
        status = "nonfinite"
        run.flush_log()
        message = _stop_message(run, step)
        run.log(message)
    else:
        if run.nonfinite:
            message = (f"{run.nonfinite} steps were skipped for non-finite or exploding losses (see the log "
                       f"above); if the loss stays high, lower the learning rate")
        if config.sample_at_end:
            run.samples(step)
    _dump_weights_for_tests(run)
    distributed.barrier(run.world)
    return TrainResult(step=step, status=status, message=message, out=str(run.out), losses=run.losses,
                       nonfinite_skipped=run.nonfinite, steps_per_s=steps_per_s,
                       samples_per_s=steps_per_s * config.batch_size * run.world, seconds=elapsed)


def _dump_weights_for_tests(run: _Run) -> None:
    """Test hook FASTDIFF_TEST_DUMP_WEIGHTS=DIR: every rank's final weights, to check that DDP
    keeps them equal."""
    dump = os.environ.get("FASTDIFF_TEST_DUMP_WEIGHTS")
    if dump:
        from safetensors.torch import save_file
        Path(dump).mkdir(parents=True, exist_ok=True)
        save_file(state_tensors("model", run.model), str(Path(dump) / f"rank{run.rank}.safetensors"))
