"""`fastdiff reproduce`: a small-scale reproduction of the claims the thesis reports.

Eight experiments on the embedded "shapes" data (16x16; 32x32 for 8) and on the oracle kit:

1. linear vs cosine schedule: bits/dim after equal training (Nichol & Dhariwal, §3.2);
2. L_simple vs L_hybrid vs L_vlb (importance-sampled t): bits/dim and sample quality;
3. the DDIM table: eta in {0, 0.2, 0.5, 1, sigma-hat} x S steps, FID-like metric (Song et al., Table 1);
4. fixed vs learned variance under respacing (Nichol & Dhariwal, Figure 8);
5. oracle convergence: the exact-law error of DDIM and ancestral sampling as the steps grow, and
   the PF-ODE solvers' error against NFE next to the closed-form solution (their orders);
6. FID-like vs NFE for the ODE/SDE solvers of docs/score-based.md against DDIM;
7. bits/dim through the probability-flow ODE against the variational bound's;
8. pixel vs latent diffusion (f = 4 autoencoder) at equal training wall-clock: speed and FID-like.

The package, one job per module:

- `run`: `Settings` (`FULL`, `QUICK`), the trained models (`MODELS`) and `Run`: the output
  folder and its caches. Everything expensive (the feature network, every trained model,
  every bits/dim evaluation and every sample set's features) goes through
  `Run.cached(key, compute)`, each file written atomically, so a rerun resumes where a killed
  one stopped and regenerates the report from the cache in seconds;
- `stats`: the intervals and the exact MMD² (below);
- `plots`: every figure, and the only module that imports matplotlib; plot functions take
  numbers, never a model or the cache;
- `report`: `Section` (one experiment's prose, tables, figures, verdict and numbers), the text
  helpers, and `write_report` (REPORT.md and results.json);
- `expN_*.py`: one experiment each, read top to bottom as compute (cached, through `Run`) ->
  numbers and tables -> plot calls -> a `Section` with its verdict.

Adding an experiment (for instance 6, FID-like against NFE for new samplers, or 7, pixel vs
latent diffusion) takes one module and one registry entry:

1. write `exp6_nfe.py` with `TITLE = "..."` and `experiment(run: Run) -> Section`. Measure
   through `run.cached(key, compute)` (a key of its own, e.g. "nfe-..."; `compute` returns
   (JSON-able record, dict of numpy arrays)) or the `Run` helpers (`run.samples_fid`,
   `run.fid_difference`, `run.bpd`, `run.real_floor`); a new trained model is one more entry
   in `run.MODELS`. Draw figures with a function added to `plots.py`, and build the `Section`
   with `report.table`, `report.fmt_ci` and `report.sign_verdict`;
2. add `6: exp6_nfe` to `REGISTRY` below. `EXPERIMENTS`, `fastdiff reproduce --only` and the
   report's summary follow from it.

Statistics (tested against independent truths in tests/test_reproduce.py):
- bits/dim: mean over held-out images with a Student-t 95% interval; model differences are
  paired (same images, same noise draws) and get a t-interval of the per-image differences;
- FID-like: Fréchet distance in the feature space of a small CNN trained on the shapes
  labels (`fastdiff.metrics.ShapesFeatures`) against held-out real shapes; 95% normal
  bootstrap intervals (point ± 1.96 bootstrap standard errors) resampling both the generated
  and the reference features; differences between sample sets drawn from the same initial
  noise are bootstrapped pairwise;
- oracle: MMD² (Gaussian kernel) between the samples and the exact mixture law, whose
  expectations are closed-form, so the estimate is unbiased; t-interval over seeds.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from fastdiff.experiments.reproduce import (exp1_schedules, exp2_losses, exp3_ddim, exp4_respacing,
                                            exp5_oracle, exp6_nfe, exp7_likelihood, exp8_latent)
from fastdiff.experiments.reproduce.plots import MATPLOTLIB_HINT, pyplot
from fastdiff.experiments.reproduce.report import REPORT_NAME, Section, write_report
from fastdiff.experiments.reproduce.run import FULL, MODELS, QUICK, SIGMA_HAT, Run, Settings, settings_for
from fastdiff.experiments.reproduce.stats import bootstrap_fid, mmd2_to_mixture, normal_bootstrap_interval, t_interval

#: Experiment number -> its module (with TITLE and experiment(run) -> Section), in report order.
REGISTRY = {1: exp1_schedules, 2: exp2_losses, 3: exp3_ddim, 4: exp4_respacing, 5: exp5_oracle, 6: exp6_nfe,
            7: exp7_likelihood, 8: exp8_latent}

#: The order of the experiments and their short titles.
EXPERIMENTS = {number: module.TITLE for number, module in REGISTRY.items()}

__all__ = ["EXPERIMENTS", "FULL", "MATPLOTLIB_HINT", "MODELS", "QUICK", "REGISTRY", "REPORT_NAME", "SIGMA_HAT", "Run",
           "Section", "Settings", "bootstrap_fid", "mmd2_to_mixture", "normal_bootstrap_interval", "reproduce",
           "settings_for", "t_interval", "write_report"]


def reproduce(out, quick: bool = False, seed: int = 0, only: Optional[Sequence[int]] = None,
              threads: Optional[int] = None, progress: bool = True, command: str = "fastdiff reproduce") -> Path:
    """Run the experiments (all, or those in `only`) and write REPORT.md + PNGs into `out`."""
    pyplot()  # fail early, before any work, when matplotlib is missing
    only = sorted(set(only)) if only else list(EXPERIMENTS)
    for k in only:
        if k not in EXPERIMENTS:
            raise ValueError(f"only must hold experiment numbers from 1 to {len(EXPERIMENTS)}, got {k!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.time()
    run = Run(out, settings_for(quick), seed=seed, progress=progress)
    sections = []
    for k in only:
        run.log(f"== experiment {k}: {EXPERIMENTS[k]} ({time.time() - t0:.0f}s elapsed)")
        sections.append(REGISTRY[k].experiment(run))
    wall = time.time() - t0
    run.record_invocation(command, wall, torch.get_num_threads(), only)
    path = write_report(run, sections, wall, torch.get_num_threads(), command)
    run.log(f"report written to {path} in {(time.time() - t0) / 60:.1f} min")
    return path
