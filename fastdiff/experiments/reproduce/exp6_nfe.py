"""Experiment 6: FID-like against the number of network evaluations (NFE) for the samplers of
#13 on the linear-schedule L_simple model of experiment 3 (Lu et al. 2022; Karras et al. 2022)."""
from __future__ import annotations

from typing import Dict, Tuple

from fastdiff.experiments.reproduce import plots
from fastdiff.experiments.reproduce.report import Section, fmt_ci, model_line, table, train_line
from fastdiff.experiments.reproduce.run import Run

TITLE = "FID-like vs NFE: ODE solvers against DDIM"
MODEL = "linear-simple"
CLAIM = ("Lu et al. (2022b) report that DPM-Solver++(2M) reaches in 10-20 network evaluations the quality DDIM needs "
         "50-100 for; Karras et al. (2022) the same for Heun's 2nd-order method. Goal here: DPM-Solver++(2M) at "
         "10 NFE within the interval of DDIM at 50 NFE (five times fewer evaluations at equal quality).")
#: NFE of a sampler with `steps` grid points (docs/score-based.md, section 4)
EVALS_PER_STEP = {"heun": 2, "pc": 2}
FULL_SAMPLERS = ("ddim", "ddpm", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "pc", "ode")
QUICK_SAMPLERS = ("ddim", "dpmpp_2m", "heun")


def steps_for(sampler: str, nfe: int) -> int:
    """Grid points giving at most `nfe` evaluations (Heun and pc: 2N - 1)."""
    k = EVALS_PER_STEP.get(sampler, 1)
    return max((nfe + k - 1) // k, 3 if sampler == "dpmpp_3m" else 1)


def experiment(run: Run) -> Section:
    s = run.settings
    quick = s.name != "full"
    nfes = (10, 50) if quick else (5, 10, 20, 50, 100)
    samplers = QUICK_SAMPLERS if quick else FULL_SAMPLERS
    cells: Dict[Tuple[str, int], dict] = {}
    for sampler in samplers:
        for nfe in (nfes if sampler != "ode" else (nfes[0],)):   # ode: steps ignored, one adaptive run
            run.log(f"[experiment 6] {sampler}, NFE {nfe}")
            cells[(sampler, nfe)] = run.samples_fid(MODEL, sampler, steps_for(sampler, nfe))[0]
    floor = run.real_floor()
    rows = [[sampler] + [fmt_ci(cells[(sampler, n)]["fid"], *cells[(sampler, n)]["ci"], digits=2)
                         if (sampler, n) in cells else "" for n in nfes] for sampler in samplers if sampler != "ode"]
    if "ode" in samplers:
        c = cells[("ode", nfes[0])]
        rows.append(["ode (RK45, rtol 1e-5; NFE adaptive, not recorded)", fmt_ci(c["fid"], *c["ci"], digits=2)]
                    + [""] * (len(nfes) - 1))
    lines = [(sampler, [cells[(sampler, n)] for n in nfes]) for sampler in samplers if sampler != "ode"]
    fig = plots.fid_vs_steps(run.out, nfes, lines, floor, "network evaluations (NFE)",
                             "FID-like vs NFE (linear-simple model)", "exp6_nfe.png")
    diff = run.fid_difference((MODEL, "dpmpp_2m", steps_for("dpmpp_2m", 10)), (MODEL, "ddim", 50))
    goal = diff[1] <= 0.0 <= diff[2] or diff[2] < 0.0
    ddim50, dpm10 = cells[("ddim", 50)], cells[("dpmpp_2m", 10)]
    verdict = (f"Goal {'met' if goal else 'not met'}: DPM-Solver++(2M) at 10 NFE scores "
               f"{fmt_ci(dpm10['fid'], *dpm10['ci'], digits=2)} against DDIM at 50 NFE "
               f"{fmt_ci(ddim50['fid'], *ddim50['ci'], digits=2)}; paired difference (2M@10 − DDIM@50) "
               f"{fmt_ci(*diff, digits=2)}" + (" (its interval holds 0 or lies below it)." if goal else
                                              " (its interval lies above 0)."))
    return Section(
        6, TITLE, CLAIM,
        [train_line(run), model_line(MODEL),
         f"{s.n_gen} samples per cell from the same initial noise (seed {run.seed + 1}), x̂_0 clipped to [-1, 1]; "
         "each sampler's own spacing (DDIM/ancestral uniform, DPM-Solver++ log-SNR, Euler/Heun Karras ρ = 7, "
         "snapped to the model's timesteps); Heun and pc use 2N − 1 evaluations for N grid points",
         f"FID-like against {s.n_ref} held-out shapes, 95% bootstrap CI; real-image floor "
         f"{fmt_ci(floor['fid'], *floor['ci'], digits=2)}"],
        [table(["sampler", *[f"NFE {n}" for n in nfes]], rows)],
        [(fig, "FID-like against NFE, one line per sampler.")],
        verdict, "goal met" if goal else "goal not met",
        numbers={"cells": {f"{k[0]}|NFE={k[1]}": v for k, v in cells.items()}, "dpmpp2m10_minus_ddim50": list(diff),
                 "goal_met": goal})
