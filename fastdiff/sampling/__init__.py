"""Sampling: the samplers (`loop`: DDIM and ancestral DDPM on respaced timesteps, one fused
`fastdiff.ops.sampler_step` per step), guidance (`guidance`: classifier-free and classifier)
and CUDA-graph replay of the loop (`cuda_graphs`)."""
from fastdiff.sampling.loop import (SAMPLERS, SPACINGS, ddim_sigma, sample, sample_in_batches, space_timesteps,
                                    step_coefficients)

__all__ = ["SAMPLERS", "SPACINGS", "ddim_sigma", "sample", "sample_in_batches", "space_timesteps", "step_coefficients"]
