"""Exact likelihood through the probability-flow ODE (docs/score-based.md, section 5).

The instantaneous change of variables (Chen et al. 2018; Song et al. 2021, Eq. 39):
along dx/dt = v(x, t), d log p_t(x_t) / dt = -div v(x_t, t), so

    log p_{t_min}(x) = log p_1(x_1) + int_{t_min}^1 div v(x_t, t) dt,

integrated with x by scipy's RK45. div v is exact (one backward pass per dimension) or
Hutchinson's unbiased estimate eps^T (dv/dx) eps with one eps per sample held fixed along the
path (Grathwohl et al. 2019), Gaussian or Rademacher.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from fastdiff import ops
from fastdiff.diffusion import GaussianDiffusion
from fastdiff.sampling.solvers import Denoiser, probability_flow
from fastdiff.sde import SDE, sde_of

DIVERGENCES = ("exact", "hutchinson")
HUTCHINSON_NOISE = ("gaussian", "rademacher")
#: step id of the Hutchinson probe in the noise stream (no sampler uses it)
HUTCHINSON_STEP = 0xFFFFFFFE


def _divergence(den: Denoiser, x: torch.Tensor, t: float, probe: Optional[torch.Tensor]):
    """(v, div v) per sample at (x, t)."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        v = probability_flow(den, x_in, t)
        if probe is not None:
            (grad,) = torch.autograd.grad((v * probe).sum(), x_in)
            div = (grad * probe).flatten(1).sum(1)
        else:
            flat_v = v.flatten(1)
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for j in range(flat_v.shape[1]):
                (grad,) = torch.autograd.grad(flat_v[:, j].sum(), x_in, retain_graph=j + 1 < flat_v.shape[1])
                div = div + grad.flatten(1)[:, j]
    return v.detach(), div.detach()


def ode_log_likelihood(model: Callable, x: torch.Tensor, diffusion=None, divergence: str = "exact",
                       noise: str = "gaussian", rtol: float = 1e-5, atol: float = 1e-5, seed: int = 0,
                       t_min: Optional[float] = None, model_kwargs: Optional[dict] = None) -> dict:
    """log p_{t_min}(x) in nats per sample under the model's PF-ODE, x taken as a sample at t_min
    (default: the process's t_min; for a discrete schedule the first knot).

    Returns {"log_prob": (B,), "prior_log_prob": (B,), "delta": (B,) the divergence integral,
    "nfe": ODE right-hand-side evaluations}."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if noise not in HUTCHINSON_NOISE:
        raise ValueError(f"noise must be one of {HUTCHINSON_NOISE}, got {noise!r}")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if diffusion is None:
        diffusion = getattr(model, "diffusion", None)
    if diffusion is None:
        raise ValueError("diffusion is required for a model without a `diffusion` attribute")
    sde = sde_of(diffusion)
    d = diffusion if isinstance(diffusion, GaussianDiffusion) else None
    t0 = sde.t_min if t_min is None else float(t_min)
    if not 0 < t0 < sde.t_max:
        raise ValueError(f"t_min must be in (0, {sde.t_max}), got {t_min!r}")
    prediction = d.prediction if d is not None else getattr(model, "prediction", "eps")
    den = Denoiser(model, sde, prediction, model_kwargs, split_output=d.split_output if d is not None else None)
    probe = None
    if divergence == "hutchinson":
        z = ops.randn(x.shape, seed=seed, step=HUTCHINSON_STEP, dtype=x.dtype, device=x.device)
        probe = z if noise == "gaussian" else torch.sign(z)
    shape, batch, dtype = x.shape, x.shape[0], x.dtype
    numel = x[0].numel()

    def rhs(t, y):
        xt = torch.from_numpy(y[: batch * numel]).reshape(shape).to(device=x.device, dtype=dtype)
        v, div = _divergence(den, xt, t, probe)
        return np.concatenate([v.double().cpu().numpy().reshape(-1), div.double().cpu().numpy()])

    from scipy.integrate import solve_ivp

    y0 = np.concatenate([x.detach().double().cpu().numpy().reshape(-1), np.zeros(batch)])
    sol = solve_ivp(rhs, (t0, sde.t_max), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"the probability-flow ODE solver failed: {sol.message}")
    end = sol.y[:, -1]
    x_T = torch.from_numpy(end[: batch * numel]).reshape(shape)
    delta = torch.from_numpy(end[batch * numel:])
    prior = sde.prior_logp(x_T)
    return {"log_prob": prior + delta, "prior_log_prob": prior, "delta": delta, "nfe": den.nfe}


def ode_nll_bpd(model: Callable, x0: torch.Tensor, diffusion=None, divergence: str = "hutchinson",
                dequantize: bool = True, generator: Optional[torch.Generator] = None, **kwargs) -> dict:
    """Bits/dim of images x0 on the 256-level grid in [-1, 1] (as `GaussianDiffusion.nll_bpd`)
    through the ODE, with uniform dequantisation: x = x0 + (2u - 1) / 255, u ~ U[0, 1), fills
    each pixel's bin of width 2/255, and

        bpd = -(log p(x) + D log(2/255)) / (D log 2),

    an upper bound (in expectation over u, by Jensen) on the discrete model's NLL
    -log2 P(x0) / D with P(x0) = the model's mass in x0's bins. kwargs: ode_log_likelihood's.

    Returns {"total_bpd": (B,), "log_prob": (B,) nats, "nfe"}."""
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() < 2:
        raise TypeError(f"x0 must be a floating-point image batch (B, ...), got {type(x0).__name__}")
    dims = x0[0].numel()
    x = x0
    if dequantize:
        u = torch.rand(x0.shape, generator=generator, dtype=torch.float64).to(device=x0.device, dtype=x0.dtype)
        x = x0 + (2.0 * u - 1.0) / 255.0
    res = ode_log_likelihood(model, x, diffusion, divergence=divergence, **kwargs)
    bpd = -(res["log_prob"] + dims * math.log(2.0 / 255.0)) / (dims * math.log(2.0))
    return {"total_bpd": bpd, "log_prob": res["log_prob"], "nfe": res["nfe"]}


__all__ = ["ode_log_likelihood", "ode_nll_bpd", "SDE"]
