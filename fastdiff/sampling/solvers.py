"""Continuous-time samplers: fast ODE solvers of the probability-flow ODE, the reverse SDE and
predictor-corrector, each one function with the same signature (k-diffusion style):

    fn(denoise: Denoiser, x: Tensor, grid: Grid, opts: SamplerOptions) -> Tensor

`grid` holds the times t_0 > t_1 > ... > t_N and their marginal coefficients (alpha_i, sigma_i);
the final point t_N = None is the data, (alpha_N, sigma_N) = (1, 0) unless the diffusion says
otherwise. Every sampler ends with the same first-order
step into sigma = 0: x <- alpha_N x0(x, t_{N-1}) (DDIM's last step; DPM-Solver's
"final_sigmas_type='zero'"), so `steps` = N model evaluations for the one-evaluation solvers.

The model is seen through `Denoiser` as x0(x, t) ("the denoiser" of Karras et al.): every
prediction type, classifier-free and classifier guidance and clipping are applied there.
For a discrete-time model every time the solvers evaluate at is first snapped to a knot of
the model's schedule (`SDE.snap`) and the solver uses that knot's exact alpha and sigma, so
the model always sees one of its own timesteps (docs/score-based.md, "Conventions").
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from fastdiff import ops
from fastdiff.sampling import guidance
from fastdiff.sde import SDE, to_x0

#: step ids of the noise stream: sampler step i uses ids i * NOISE_STRIDE + j, j < NOISE_STRIDE
NOISE_STRIDE = 16


@dataclasses.dataclass
class Grid:
    """t: N + 1 times (descending), t[N] None for the data; alpha, sigma: their marginal
    coefficients, the last one the point the sampler ends at (sigma = 0: the data)."""

    t: List[Optional[float]]
    alpha: np.ndarray
    sigma: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.t) - 1

    def log_snr(self, i: int) -> float:
        return math.inf if self.sigma[i] == 0 else math.log(self.alpha[i] / self.sigma[i])


def make_grid(sde: SDE, times, final_alpha_cumprod: float = 1.0) -> Grid:
    t = [float(v) for v in times]
    alpha = sde.alpha(torch.tensor(t, dtype=torch.float64)).numpy()
    sigma = sde.sigma(torch.tensor(t, dtype=torch.float64)).numpy()
    fa = math.sqrt(final_alpha_cumprod)
    return Grid(t + [None], np.append(alpha, fa), np.append(sigma, math.sqrt(max(1.0 - final_alpha_cumprod, 0.0))))


@dataclasses.dataclass
class SamplerOptions:
    seed: int = 0
    sample_offset: int = 0
    eta: float = 0.0
    s_churn: float = 0.0            # Karras et al. Alg. 2
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    snr: float = 0.16               # Langevin corrector's signal-to-noise ratio (Song et al., Alg. 4)
    corrector_steps: int = 1
    rtol: float = 1e-5
    atol: float = 1e-5


class Denoiser:
    """x0(x, t): the model's x_0 prediction at time t (already a time the model accepts),
    with guidance and clipping; counts the network evaluations in `nfe`."""

    def __init__(self, model: Callable, sde: SDE, prediction: str, model_kwargs: Optional[dict] = None,
                 clip_denoised: bool = False, split_output: Optional[Callable] = None,
                 classifier: Optional[Callable] = None, labels: Optional[torch.Tensor] = None,
                 classifier_scale: float = 1.0):
        self.model, self.sde, self.prediction = model, sde, prediction
        self.model_kwargs = model_kwargs or {}
        self.clip = clip_denoised
        self.split_output = split_output
        self.classifier, self.labels, self.classifier_scale = classifier, labels, classifier_scale
        self.nfe = 0

    def coefficients(self, t: float):
        tt = torch.tensor(t, dtype=torch.float64)
        return float(self.sde.alpha(tt)), float(self.sde.sigma(tt))

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        alpha, sigma = self.coefficients(t)
        model_t = self.sde.model_time(t, x.shape[0], x.device)
        out = unwrap_output(self.model(x, model_t, **self.model_kwargs)).to(x.dtype)
        if self.split_output is not None:
            out = self.split_output(out, x)[0]  # the mean channels of a learned variance
        elif out.shape != x.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} does not match x shape {tuple(x.shape)}")
        self.nfe += 1
        x0 = to_x0(self.prediction, out, x, alpha, sigma)
        if self.classifier is not None:
            # Dhariwal & Nichol Eq. 14: eps^ = eps - s sigma grad log p(y | x_t), i.e.
            # x0^ = x0 + s sigma^2 / alpha grad
            grad = guidance.classifier_log_prob_grad(self.classifier, x, model_t, self.labels)
            x0 = x0 + (self.classifier_scale * sigma ** 2 / alpha) * grad
        return x0.clamp(-1.0, 1.0) if self.clip else x0

    def eps(self, x: torch.Tensor, t: float) -> torch.Tensor:
        alpha, sigma = self.coefficients(t)
        return (x - alpha * self(x, t)) / sigma

    def at_log_snr(self, lam: float) -> float:
        """The model time nearest to log-SNR `lam` (snapped for a discrete model)."""
        return self.sde.snap(float(self.sde.t_of_log_snr(lam)))


def unwrap_output(out):
    """A model output that is not a tensor but carries `.sample` (diffusers' UNet2DOutput)."""
    if not isinstance(out, torch.Tensor):
        sample = getattr(out, "sample", None)
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"the model must return a tensor (or an object with a tensor `.sample`), got "
                            f"{type(out).__name__}")
        out = sample
    if not out.is_floating_point():  # an int/bool output would be cast to x's dtype without a word (#12)
        raise TypeError(f"the model returned a {out.dtype} tensor; a diffusion model's output must be floating point")
    return out


def _noise(x: torch.Tensor, opts: SamplerOptions, step: int, sub: int = 0) -> torch.Tensor:
    """The noise of sampler step `step` (sub-draw `sub`): a function of (seed, sample, step, element)."""
    return ops.randn(x.shape, seed=opts.seed, step=step * NOISE_STRIDE + sub, sample_offset=opts.sample_offset,
                     dtype=x.dtype, device=x.device)


def _denoise_final(den: Denoiser, x: torch.Tensor, grid: Grid, i: int, x0: Optional[torch.Tensor] = None):
    """First-order (DDIM, eta = 0) step from grid point i to i + 1 given x0 at point i."""
    if x0 is None:
        x0 = den(x, grid.t[i])
    a, s, a_next, s_next = grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]
    return a_next * x0 + (s_next / s) * (x - a * x0)


# --------------------------------------------------------------------------- Karras et al. (2022)
def _churn(den: Denoiser, x: torch.Tensor, grid: Grid, i: int, opts: SamplerOptions):
    """Alg. 2 lines 4-6: raise the noise level sigma~ -> sigma~ (1 + gamma) with fresh noise.
    Returns (x, time, alpha, sigma) at the (snapped) raised level."""
    t, a, s = grid.t[i], grid.alpha[i], grid.sigma[i]
    sig = s / a
    gamma = min(opts.s_churn / grid.steps, math.sqrt(2.0) - 1.0) if opts.s_tmin <= sig <= opts.s_tmax else 0.0
    if gamma <= 0.0:
        return x, t, a, s
    t_hat = den.at_log_snr(-math.log(sig * (1.0 + gamma)))
    a_hat, s_hat = den.coefficients(t_hat)
    sig_hat = s_hat / a_hat
    if sig_hat <= sig:  # snapped back to the same knot: no churn possible at this step
        return x, t, a, s
    z = _noise(x, opts, i)
    x_tilde = x / a + math.sqrt(sig_hat ** 2 - sig ** 2) * opts.s_noise * z
    return x_tilde * a_hat, t_hat, a_hat, s_hat


def _karras_step(den: Denoiser, x: torch.Tensor, grid: Grid, i: int, opts: SamplerOptions, heun: bool):
    """One step of Alg. 1 (s_churn = 0) or Alg. 2 in the scaled variable x~ = x / alpha,
    sigma~ = sigma / alpha, where the PF-ODE is dx~/dsigma~ = (x~ - D(x~)) / sigma~ (Eq. 4 with s = 1)."""
    x, t, a, s = _churn(den, x, grid, i, opts)
    a_next, s_next = grid.alpha[i + 1], grid.sigma[i + 1]
    sig, sig_next = s / a, s_next / a_next
    x_tilde = x / a
    d = (x_tilde - den(x, t)) / sig
    x_next = x_tilde + (sig_next - sig) * d                                       # Euler (Alg. 1 line 5)
    if heun and sig_next > 0 and grid.t[i + 1] is not None:                                                      # Alg. 1 lines 6-8
        d_next = (x_next - den(x_next * a_next, grid.t[i + 1])) / sig_next
        x_next = x_tilde + (sig_next - sig) * 0.5 * (d + d_next)
    return x_next * a_next


def sample_euler(den, x, grid, opts):
    """Euler steps of the PF-ODE (Karras et al. 2022, Alg. 2 without the Heun correction;
    Alg. 1 with s_churn = 0). First order."""
    for i in range(grid.steps):
        x = _karras_step(den, x, grid, i, opts, heun=False)
    return x


def sample_heun(den, x, grid, opts):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1; Alg. 2 with s_churn > 0); the step
    into sigma = 0 is an Euler step. 2N - 1 model evaluations."""
    for i in range(grid.steps):
        x = _karras_step(den, x, grid, i, opts, heun=True)
    return x


# --------------------------------------------------------------------------- DPM-Solver (Lu et al.)
def sample_dpm_solver_2(den, x, grid, opts):
    """DPM-Solver-2 singlestep (Lu et al. 2022a, Alg. 1, noise-prediction form, r1 = 1/2 in
    log-SNR; r1 re-measured after snapping for discrete models). 2 evaluations per step."""
    return _dpm_solver_singlestep(den, x, grid, order=2)


def sample_dpm_solver_3(den, x, grid, opts):
    """DPM-Solver-3 singlestep (Lu et al. 2022a, Alg. 2, r1 = 1/3, r2 = 2/3). 3 evaluations per step."""
    return _dpm_solver_singlestep(den, x, grid, order=3)


def _dpm_solver_singlestep(den: Denoiser, x: torch.Tensor, grid: Grid, order: int):
    for i in range(grid.steps):
        if grid.sigma[i + 1] == 0:
            x = _denoise_final(den, x, grid, i)
            continue
        lam, lam_next = grid.log_snr(i), grid.log_snr(i + 1)
        h = lam_next - lam
        a, s, a_next, s_next = grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]
        eps = den.eps(x, grid.t[i])
        phi = math.expm1(h)                                                         # e^h - 1
        base = (a_next / a) * x - s_next * phi * eps                                # DDIM (Eq. 3.7)
        ts = [den.at_log_snr(lam + r * h) for r in ((0.5,) if order == 2 else (1 / 3, 2 / 3))]
        rs = [(float(den.sde.log_snr(torch.tensor(tt, dtype=torch.float64))) - lam) / h for tt in ts]
        if not all(0.0 < r < 1.0 for r in rs) or (order == 3 and not rs[0] < rs[1]):
            x = base  # the snapped intermediate times collapsed onto the ends: first order
            continue
        a1, s1 = den.coefficients(ts[0])
        u1 = (a1 / a) * x - s1 * math.expm1(rs[0] * h) * eps
        d1 = den.eps(u1, ts[0]) - eps
        if order == 2:
            x = base - s_next / (2.0 * rs[0]) * phi * d1                            # Alg. 1 line 5
            continue
        r1, r2 = rs
        a2, s2 = den.coefficients(ts[1])
        u2 = ((a2 / a) * x - s2 * math.expm1(r2 * h) * eps
              - s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1.0) * d1)       # Alg. 2 line 6
        d2 = den.eps(u2, ts[1]) - eps
        x = base - s_next / r2 * (phi / h - 1.0) * d2                               # Alg. 2 line 8
    return x


def sample_dpmpp_2m(den, x, grid, opts):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): multistep, data-prediction form; the first
    step and the step into sigma = 0 are first order."""
    return _dpmpp_multistep(den, x, grid, order=2)


def sample_dpmpp_3m(den, x, grid, opts):
    """DPM-Solver++(3M) (Lu et al. 2022b, App. B: third-order multistep in the data-prediction
    form); warm-up steps of orders 1 and 2, the step into sigma = 0 first order.

    The second-derivative term is 2 (e^{-h} - 1 + h) / h^2 - 1 times D2 = (D1_0 - D1_1) / (r0 + r1)
    ~ h^2 x0'' / 2: the exact weight of x0'' h^2 / 2 in the integral of e^{-(h - tau)} x0. diffusers'
    and k-diffusion's 3M use half that weight, which leaves an O(h^3) local error (a second-order
    method; this one is exact for x0 quadratic in lambda and measures order 3:
    tests/test_solvers.py)."""
    return _dpmpp_multistep(den, x, grid, order=3)


def _dpmpp_multistep(den: Denoiser, x: torch.Tensor, grid: Grid, order: int):
    history: List[torch.Tensor] = []   # x0 predictions, newest last
    lams: List[float] = []
    for i in range(grid.steps):
        x0 = den(x, grid.t[i])
        history, lams = (history + [x0])[-order:], (lams + [grid.log_snr(i)])[-order:]
        if grid.sigma[i + 1] == 0:
            x = _denoise_final(den, x, grid, i, x0)
            continue
        lam_next = grid.log_snr(i + 1)
        h = lam_next - lams[-1]
        a_next, s_ratio = grid.alpha[i + 1], grid.sigma[i + 1] / grid.sigma[i]
        phi1 = math.expm1(-h)                                                       # e^{-h} - 1
        if len(history) == 1:
            x = s_ratio * x - a_next * phi1 * x0                                    # Eq. 3.9 (first order)
        elif len(history) == 2:
            r = (lams[-1] - lams[-2]) / h
            d = (1.0 + 0.5 / r) * history[-1] - (0.5 / r) * history[-2]            # Alg. 2 line 7
            x = s_ratio * x - a_next * phi1 * d
        else:
            h0, h1 = lams[-1] - lams[-2], lams[-2] - lams[-3]
            r0, r1 = h0 / h, h1 / h
            d1_0 = (history[-1] - history[-2]) / r0
            d1_1 = (history[-2] - history[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)                              # first derivative in lambda
            d2 = (d1_0 - d1_1) / (r0 + r1)                                          # second derivative
            x = (s_ratio * x - a_next * phi1 * history[-1] + a_next * (phi1 / h + 1.0) * d1
                 - a_next * (2.0 * (phi1 + h) / h ** 2 - 1.0) * d2)
    return x


# --------------------------------------------------------------------------- UniPC (Zhao et al. 2023)
def sample_unipc(den, x, grid, opts):
    """UniPC-2 with B(h) = e^h - 1 ("bh2"; Zhao et al. 2023, Alg. 2 and Eq. 14 in the data-prediction
    form): the UniP-2 predictor (here DPM-Solver++(2M)'s update) and after every evaluation the
    UniC corrector, which reuses that evaluation, so NFE = steps. The first step and the step
    into sigma = 0 are first order; the corrector raises the order of the predictor by one."""
    history: List[torch.Tensor] = []
    lams: List[float] = []
    prev_x, prev_order = None, 0
    for i in range(grid.steps):
        x0 = den(x, grid.t[i])
        if prev_x is not None:   # UniC: correct x_i with the model output at the uncorrected x_i
            x = _unipc_update(prev_x, history, lams, grid, i - 1, prev_order, x0)
        history, lams = (history + [x0])[-2:], (lams + [grid.log_snr(i)])[-2:]
        if grid.sigma[i + 1] == 0:
            return _denoise_final(den, x, grid, i, x0)
        prev_x, prev_order = x, len(history)
        x = _unipc_update(x, history, lams, grid, i, prev_order, None)
    return x


def _unipc_update(x: torch.Tensor, history: List[torch.Tensor], lams: List[float], grid: Grid, i: int, order: int,
                  x0_next: Optional[torch.Tensor]) -> torch.Tensor:
    """From x at grid point i (history[-1] = x0 there, lams its log-SNR) to point i + 1: the
    UniP predictor of `order` when x0_next is None, else UniC of `order` with x0_next the model's
    x0 at point i + 1. B(h) = e^{-h} - 1 in the data-prediction variable (bh2); the weights rho
    solve the order conditions R rho = b (Zhao et al. 2023, Eq. 9 / Alg. 2 with phi_k)."""
    hh = -(grid.log_snr(i + 1) - lams[-1])                           # -h
    phi1 = math.expm1(hh)
    b_h = phi1                                                      # bh2
    x_pred = (grid.sigma[i + 1] / grid.sigma[i]) * x - grid.alpha[i + 1] * phi1 * history[-1]
    diffs, rks = [], []
    if order == 2:
        r = (lams[-2] - lams[-1]) / -hh
        rks.append(r)
        diffs.append((history[-2] - history[-1]) / r)
    rks.append(1.0)
    if x0_next is None:                                             # UniP
        if order == 1:
            return x_pred
        rhos = [0.5]                                                # the order-2 solution of R rho = b
    else:                                                           # UniC
        diffs.append(x0_next - history[-1])
        rhos = [0.5] if order == 1 else _unipc_rhos(rks, hh, b_h)
    return x_pred - grid.alpha[i + 1] * b_h * sum(rho * d for rho, d in zip(rhos, diffs))


def _unipc_rhos(rks: List[float], hh: float, b_h: float) -> List[float]:
    """Solve sum_k rho_k r_k^(j-1) = phi_{j+1}(h) j! / B(h), j = 1..K, with phi_{k+1} = (phi_k - 1/k!) / (-h)
    recursively from phi_1 = (e^{-h} - 1) / (-h) ... (the h-scaled phi functions of Alg. 2)."""
    k_max = len(rks)
    h_phi = math.expm1(hh) / hh - 1.0
    factorial = 1.0
    rows, b = [], []
    for j in range(1, k_max + 1):
        rows.append([r ** (j - 1) for r in rks])
        b.append(h_phi * factorial / b_h)
        factorial *= j + 1
        h_phi = h_phi / hh - 1.0 / factorial
    return np.linalg.solve(np.array(rows), np.array(b)).tolist()


# --------------------------------------------------------------------------- reverse SDE (Song et al.)
def sample_sde(den, x, grid, opts):
    """Reverse-time SDE by Euler-Maruyama (Song et al. 2021, Eq. 6 discretised):
    x <- x - [f(t) x - g(t)^2 score(x, t)] dt + g(t) sqrt(dt) z with dt = t_i - t_{i+1} > 0
    (f, g at t_i); the last step is the noise-free denoising step."""
    sde = den.sde
    for i in range(grid.steps):
        t = grid.t[i]
        if grid.sigma[i + 1] == 0 or i + 1 == grid.steps:
            x = _denoise_final(den, x, grid, i)
            continue
        dt = t - grid.t[i + 1]
        score = -den.eps(x, t) / grid.sigma[i]
        f, g2 = float(sde.f(t)), float(sde.g2(t))
        x = x - (f * x - g2 * score) * dt + math.sqrt(g2 * dt) * _noise(x, opts, i)
    return x


def sample_pc(den, x, grid, opts):
    """Predictor-corrector (Song et al. 2021, Alg. 1): at each time, `corrector_steps` Langevin
    corrector steps then the reverse-diffusion predictor (Eq. 46: x <- x - f_i(x) + G_i^2 score
    + G_i z from the transition t_{i+1} -> t_i: x_i = a x_{i+1} + G_i z, a = alpha_i / alpha_{i+1},
    G_i^2 = sigma_i^2 - a^2 sigma_{i+1}^2).

    Corrector step size: Alg. 5's 2 a (r |z| / |score|)^2 with |z|^2 = D and |score|^2 = D / sigma^2
    (their values for Gaussian noise), i.e. 2 a (r sigma_t)^2, where score_sde measures both
    norms as averages over the batch: here a sample's update does not depend on the rest of the
    batch (the noise contract) and cannot blow up where its score vanishes."""
    for i in range(grid.steps):
        t, a_i, s_i = grid.t[i], grid.alpha[i], grid.sigma[i]
        last = i + 1 == grid.steps
        step_alpha = 1.0 if last else (a_i / grid.alpha[i + 1]) ** 2
        step = 2.0 * step_alpha * (opts.snr * s_i) ** 2
        for j in range(opts.corrector_steps):
            score = -den.eps(x, t) / s_i
            x = x + step * score + math.sqrt(2.0 * step) * _noise(x, opts, i, 1 + j)
        if last:
            x = _denoise_final(den, x, grid, i)
            continue
        a = a_i / grid.alpha[i + 1]
        g2 = s_i ** 2 - a ** 2 * grid.sigma[i + 1] ** 2
        score = -den.eps(x, t) / s_i
        x = x - (a - 1.0) * x + g2 * score + math.sqrt(g2) * _noise(x, opts, i)
    return x


# --------------------------------------------------------------------------- adaptive PF-ODE
def probability_flow(den: Denoiser, x: torch.Tensor, t: float) -> torch.Tensor:
    """dx/dt = f(t) x - g(t)^2 / 2 score(x, t) (Song et al. 2021, Eq. 13)."""
    t_eval = den.sde.snap(t)
    alpha, sigma = den.coefficients(t_eval)
    score = -(x - alpha * den(x, t_eval)) / sigma ** 2
    return float(den.sde.f(t)) * x - 0.5 * float(den.sde.g2(t)) * score


def sample_ode(den, x, grid, opts):
    """The PF-ODE from t_0 to t_{N-1} by scipy's adaptive Runge-Kutta (Dormand-Prince RK45 with
    rtol/atol: a maintained, well-tested integrator with error control, rather than our own),
    the batch as one system in float64, then the denoising step into sigma = 0. `grid` gives
    only the end times (t_0, t_{N-1}, t_N); the NFE is whatever the tolerances need (`Denoiser.nfe`)."""
    from scipy.integrate import solve_ivp

    shape, dtype = x.shape, x.dtype

    def rhs(t, y):
        xt = torch.from_numpy(y).reshape(shape).to(device=x.device, dtype=dtype)
        return probability_flow(den, xt, t).double().cpu().numpy().reshape(-1)

    t0, t1 = grid.t[0], grid.t[-2]
    sol = solve_ivp(rhs, (t0, t1), x.double().cpu().numpy().reshape(-1), method="RK45",
                    rtol=opts.rtol, atol=opts.atol)
    if not sol.success:
        raise RuntimeError(f"the probability-flow ODE solver failed: {sol.message}")
    x = torch.from_numpy(sol.y[:, -1]).reshape(shape).to(device=x.device, dtype=dtype)
    last = Grid([t1, grid.t[-1]], grid.alpha[-2:], grid.sigma[-2:])
    return _denoise_final(den, x, last, 0)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    fn: Callable
    default_spacing: str
    order: int = 1              # fewest steps accepted
    stochastic: bool = False


SOLVERS: Dict[str, SamplerSpec] = {
    "euler": SamplerSpec(sample_euler, "karras"),
    "heun": SamplerSpec(sample_heun, "karras", order=1),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, "logsnr", order=2),
    "dpmpp_3m": SamplerSpec(sample_dpmpp_3m, "logsnr", order=3),
    "dpm_solver_2": SamplerSpec(sample_dpm_solver_2, "logsnr"),
    "dpm_solver_3": SamplerSpec(sample_dpm_solver_3, "logsnr"),
    "sde": SamplerSpec(sample_sde, "uniform", stochastic=True),
    "pc": SamplerSpec(sample_pc, "uniform", stochastic=True),
    "ode": SamplerSpec(sample_ode, "uniform"),
    "unipc": SamplerSpec(sample_unipc, "logsnr", order=2),
}
