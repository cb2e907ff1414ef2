"""The step loop every fastdiff trainer runs: `fastdiff train` (`loop.py`) and
`fastdiff train-autoencoder` (`autoencoder.py`).

One loop, so the two agree on what a skipped step, a time budget and a checkpoint mean:

- a step whose loss or gradients are not finite (or explode) is skipped and counted; above
  `config.max_nonfinite` skipped steps the run stops with status "nonfinite";
- a run with `config.max_minutes` stops with status "time" when the budget has run out;
- a checkpoint is due every `config.save_every` steps; one falling just after a skipped step
  waits for the next step that went well, and a checkpoint that finds non-finite weights stops
  the run ("nonfinite");
- the step rate leaves out the first two (warm-up) steps.

The trainer's run object supplies the steps and the saving (`SteppedRun`); what happens after
the loop (the final checkpoint, the result record) stays with each trainer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Protocol, Tuple

import numpy as np


class SteppedRun(Protocol):
    """What `run_steps` needs of a trainer's run."""

    config: object          # steps, save_every, log_every, max_nonfinite, max_minutes
    start_step: int
    nonfinite: int          # skipped steps so far (run_steps counts them here)
    losses: List[Tuple[int, float]]

    def optimize(self, step: int) -> Optional[str]:
        """One optimisation step; None when it went well, else what was not finite."""

    def checkpoint(self, step: int) -> object:
        """Save step `step`; falsy when the weights are not finite (nothing saved)."""

    def out_of_time(self, t_start: float) -> bool: ...

    def progress_bar(self): ...

    def log(self, msg: str) -> None: ...

    def after_step(self, step: int) -> None:
        """Anything else due after step `step` (sample grids)."""


@dataclass
class StepsOutcome:
    step: int            # the steps done, counting the resumed ones
    status: str          # "done", "time" or "nonfinite"
    message: str
    seconds: float       # wall-clock of the loop
    steps_per_s: float   # leaving out the two warm-up steps


def run_steps(run: SteppedRun) -> StepsOutcome:
    """Run `run` from run.start_step to run.config.steps (or until it stops early)."""
    config = run.config
    status, message = "done", ""
    t_start = time.time()
    timer = _StepTimer(run.start_step)
    step = run.start_step
    bar = run.progress_bar()
    save_due = False
    try:
        while step < config.steps:
            timer.tick(step)
            failed = run.optimize(step)
            if failed:
                run.nonfinite += 1
                what = failed if failed.startswith("exploding") else f"non-finite {failed}"
                run.log(f"step {step}: {what}, step skipped ({run.nonfinite} so far, stopping above "
                        f"{config.max_nonfinite})")
            step += 1
            if bar is not None:
                bar.update(1)
                if step % config.log_every == 0 and run.losses:
                    bar.set_postfix(loss=f"{np.mean([l for _, l in run.losses[-config.log_every:]]):.4f}")
            if run.nonfinite > config.max_nonfinite:
                status = "nonfinite"
                break
            if run.out_of_time(t_start) and step < config.steps:
                status, message = "time", f"stopped at step {step}: the {config.max_minutes} minute budget ran out"
                break
            save_due = save_due or step % config.save_every == 0
            if save_due and not failed and step < config.steps:
                save_due = False
                if not run.checkpoint(step):
                    status = "nonfinite"
                    break
            if step < config.steps:
                run.after_step(step)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.time() - t_start
    return StepsOutcome(step=step, status=status, message=message, seconds=elapsed,
                        steps_per_s=timer.rate(step, elapsed))


def budget_spent(config, t_start: float) -> bool:
    """Whether the run's wall-clock budget (config.max_minutes from t_start) has run out."""
    return config.max_minutes is not None and time.time() - t_start > 60.0 * config.max_minutes


def step_progress_bar(config, start_step: int, desc: str):
    """A tqdm bar over the run's steps; a run bounded by the clock (the demos: steps = 10**7 and
    max_minutes) has no meaningful step total, so its bar counts steps without one."""
    from tqdm.auto import tqdm

    total = config.steps if config.max_minutes is None or config.steps < 10 ** 6 else None
    return tqdm(total=total, initial=start_step, desc=desc, dynamic_ncols=True, mininterval=1.0)


class _StepTimer:
    """Steps per second, leaving out the first two (warm-up) steps of the run."""

    def __init__(self, start_step: int):
        self.start_step, self.t0, self.steps = start_step, None, 0

    def tick(self, step: int) -> None:
        if self.t0 is None and step - self.start_step == 2:
            self.t0, self.steps = time.time(), 0
        self.steps += 1

    def rate(self, step: int, elapsed: float) -> float:
        if self.t0 is not None:
            timed = time.time() - self.t0
            if timed > 0 and self.steps:
                return self.steps / timed
        return (step - self.start_step) / max(elapsed, 1e-9)
