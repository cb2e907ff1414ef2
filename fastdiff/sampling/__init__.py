"""Sampling: `sample` (loop: argument checks, spacing, guidance, dispatch), the fused DDIM /
ancestral DDPM loop, the continuous-time solvers (`solvers`: Euler, Heun, DPM-Solver(++),
reverse SDE, predictor-corrector, adaptive PF-ODE), step schedules (`spacing`), exact
likelihood through the ODE (`likelihood`), guidance (`guidance`) and CUDA-graph replay of the
fused loop (`cuda_graphs`)."""
from fastdiff.sampling.loop import (DEFAULT_SPACING, SAMPLERS, ddim_sigma, sample, sample_in_batches,
                                    step_coefficients)
from fastdiff.sampling.spacing import SPACINGS, space_timesteps

__all__ = ["DEFAULT_SPACING", "SAMPLERS", "SPACINGS", "ddim_sigma", "sample", "sample_in_batches", "space_timesteps",
           "step_coefficients"]
