"""The continuous-time (score-based) view: SDEs, their marginals and the probability-flow ODE
(Song et al. 2021, *Score-Based Generative Modeling through SDEs*; docs/score-based.md).

Every process here is linear with marginals q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I):

    dx = f(t) x dt + g(t) dW,   f = d log alpha / dt,   g^2 = d sigma^2 / dt - 2 f sigma^2     (Eq. 5.0 below)

and its probability-flow ODE (Song et al., Eq. 13) is dx/dt = f x - g^2 / 2 * score(x, t) with
score = -eps / sigma. `VPSDE` is the continuous linear-beta process, `VESDE` the
variance-exploding one, and `DiscreteVPSDE` the VP process through the knots of a fastdiff
`NoiseSchedule`: abar(t_k) = alphas_cumprod[k] at t_k = (k + 1) / T, log abar linear between
knots and abar(0) = 1, so a DDPM eps-model *is* a score model of this SDE (docs/score-based.md).

Times are floats in [0, 1]; t = 0 is the data for the VP processes. `model_time(t)` is what a
network is fed: the original timestep (LongTensor, nearest knot) for a discrete schedule,
t itself (float) for the continuous processes.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

from fastdiff.diffusion import PREDICTIONS, _check_choice
from fastdiff.schedule import NoiseSchedule

Time = Union[float, torch.Tensor]
LOG_2PI = math.log(2.0 * math.pi)


def _t64(t: Time) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def _finite_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class SDE:
    """A linear SDE given by its marginal coefficients alpha(t), sigma(t) (subclasses)."""

    #: smallest time the samplers evaluate the model at (score_sde's sampling eps)
    t_min: float = 1e-3
    t_max: float = 1.0

    # -- marginals (subclasses) -----------------------------------------------------------
    def log_alpha(self, t: Time) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: Time) -> torch.Tensor:
        raise NotImplementedError

    def f(self, t: Time) -> torch.Tensor:
        """Drift coefficient f(t) = d log alpha / dt."""
        raise NotImplementedError

    def g2(self, t: Time) -> torch.Tensor:
        """Squared diffusion g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2."""
        raise NotImplementedError

    # -- derived ------------------------------------------------------------------------
    def alpha(self, t: Time) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def log_snr(self, t: Time) -> torch.Tensor:
        """lambda(t) = log(alpha / sigma) (Lu et al.'s half log-SNR)."""
        return self.log_alpha(t) - torch.log(self.sigma(t))

    def t_of_log_snr(self, lam: Union[float, np.ndarray]) -> np.ndarray:
        """The time whose lambda(t) is `lam` (lambda is decreasing in t), by interpolation on a
        fine grid refined by bisection; exact to ~1e-12 in t."""
        lam = np.asarray(lam, dtype=np.float64)
        lo, hi = np.full(lam.shape, self.t_min), np.full(lam.shape, self.t_max)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(torch.as_tensor(mid)).numpy() > lam
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def marginal(self, x0: torch.Tensor, t: Time, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x_0 + sigma(t) noise (t scalar or (B,))."""
        return _bcast(self.alpha(t), x0) * x0 + _bcast(self.sigma(t), x0) * noise

    def drift(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        return _bcast(self.f(t), x) * x

    def diffusion(self, t: Time) -> torch.Tensor:
        return torch.sqrt(self.g2(t))

    def prior_std(self) -> float:
        return float(torch.sqrt(self.alpha(self.t_max) ** 2 + self.sigma(self.t_max) ** 2))

    def prior_sample(self, noise: torch.Tensor) -> torch.Tensor:
        """x_T ~ N(0, (alpha_T^2 + sigma_T^2) I) from standard normal `noise`."""
        return noise * self.prior_std()

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_std^2 I) per sample, nats."""
        s = self.prior_std()
        flat = z.reshape(z.shape[0], -1).double()
        d = flat.shape[1]
        return -0.5 * (flat ** 2).sum(1) / s ** 2 - d * (math.log(s) + 0.5 * LOG_2PI)

    def model_time(self, t: float, batch: int, device) -> torch.Tensor:
        """What the network is fed at time t (continuous processes: t as a float)."""
        return torch.full((batch,), float(t), dtype=torch.float32, device=device)

    def snap(self, t: float) -> float:
        """The nearest time the model can be evaluated at (identity for continuous models)."""
        return float(t)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float64).to(like.device)
    if v.dim() == 0:
        return v.to(like.dtype)
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class VPSDE(SDE):
    """Variance-preserving SDE, beta(t) = beta_min + t (beta_max - beta_min) (Song et al., Eq. 32):
    log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2, sigma^2 = 1 - alpha^2,
    f = -beta / 2, g^2 = beta."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        self.beta_min = _finite_positive("beta_min", beta_min)
        self.beta_max = _finite_positive("beta_max", beta_max)
        if self.beta_max <= self.beta_min:
            raise ValueError(f"beta_max must exceed beta_min={beta_min}, got {beta_max}")
        self.t_min = _finite_positive("t_min", t_min)

    def beta(self, t: Time) -> torch.Tensor:
        return self.beta_min + _t64(t) * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Time) -> torch.Tensor:
        t = _t64(t)
        return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def sigma(self, t: Time) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def f(self, t: Time) -> torch.Tensor:
        return -0.5 * self.beta(t)

    def g2(self, t: Time) -> torch.Tensor:
        return self.beta(t)

    def t_of_log_snr(self, lam: Union[float, np.ndarray]) -> np.ndarray:
        """Closed form (Lu et al. 2022a, App. of DPM-Solver's inverse lambda): alpha^2 =
        sigmoid(2 lambda), so -log alpha = softplus(-2 lambda) / 2 =: c, and t is the positive
        root of (beta_max - beta_min) t^2 / 4 + beta_min t / 2 - c = 0, written as
        2c / (beta_min / 2 + sqrt(beta_min^2 / 4 + (beta_max - beta_min) c)) (no cancellation);
        clipped to [t_min, t_max] as the bisection of `SDE.t_of_log_snr` is."""
        c = 0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lam, dtype=np.float64))
        b = 0.5 * self.beta_min
        t = 2.0 * c / (b + np.sqrt(b * b + (self.beta_max - self.beta_min) * c))
        return np.clip(t, self.t_min, self.t_max)

    def __repr__(self) -> str:
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max})"


class VESDE(SDE):
    """Variance-exploding SDE (Song et al., Eq. 30): alpha = 1, sigma(t) = sigma_min (sigma_max /
    sigma_min)^t, f = 0, g^2 = d sigma^2 / dt = 2 sigma^2 log(sigma_max / sigma_min). The data
    sit at sigma = 0, reached by the samplers' final denoising step from t = 0 (sigma_min)."""

    t_min = 0.0

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min = _finite_positive("sigma_min", sigma_min)
        self.sigma_max = _finite_positive("sigma_max", sigma_max)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max must exceed sigma_min={sigma_min}, got {sigma_max}")
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def log_alpha(self, t: Time) -> torch.Tensor:
        return torch.zeros_like(_t64(t))

    def sigma(self, t: Time) -> torch.Tensor:
        return self.sigma_min * torch.exp(_t64(t) * self._log_ratio)

    def f(self, t: Time) -> torch.Tensor:
        return torch.zeros_like(_t64(t))

    def g2(self, t: Time) -> torch.Tensor:
        return 2.0 * self.sigma(t) ** 2 * self._log_ratio

    def schedule(self, T: int = 1000) -> NoiseSchedule:
        """The same process as a discrete VP schedule: x_vp = x_ve / sqrt(1 + sigma^2) has
        abar = 1 / (1 + sigma^2) (Karras et al.'s scaling), with sigma at the T knots
        t_k = k / (T - 1). A model trained on it (`fastdiff train --sde ve`) is an ordinary
        fastdiff eps-model of the VP-scaled input."""
        sig = self.sigma(torch.linspace(0.0, 1.0, T, dtype=torch.float64))
        abar = 1.0 / (1.0 + sig ** 2)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return NoiseSchedule(1.0 - abar / prev, name=f"ve-{self.sigma_min:g}-{self.sigma_max:g}")

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class DiscreteVPSDE(SDE):
    """The VP SDE through a discrete schedule's knots: abar(t_k) = alphas_cumprod[k] at
    t_k = (k + 1) / T, abar(0) = 1, log abar linear in t between knots, so beta(t) = -d log abar
    / dt is piecewise constant (T beta_k in the limit of small betas: Song et al., App. B).

    The model is fed original timesteps (`timestep_map[k]`, a LongTensor) of the nearest knot
    (`quantize=True`, the fastdiff model contract), or the fractional index t T - 1 as a float
    (`quantize=False`, for networks trained in continuous time).
    """

    def __init__(self, schedule: NoiseSchedule, timestep_map: Optional[Sequence[int]] = None,
                 quantize: bool = True):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a fastdiff.NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.T = schedule.T
        self.timestep_map = torch.arange(self.T) if timestep_map is None else \
            torch.as_tensor(list(timestep_map), dtype=torch.int64)
        self.quantize = bool(quantize)
        self._knots = torch.arange(self.T + 1, dtype=torch.float64) / self.T      # 0, t_0, ..., t_{T-1}
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(schedule.alphas_cumprod)])
        self._slopes = torch.diff(self._log_abar) * self.T                         # d log abar / dt per interval
        self.t_min = 1.0 / self.T

    def _interval(self, t: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.ceil(t * self.T - 1e-9).long() - 1, 0, self.T - 1)

    def log_alpha(self, t: Time) -> torch.Tensor:
        t = _t64(t)
        k = self._interval(t)
        return 0.5 * (self._log_abar[k] + self._slopes[k] * (t - self._knots[k]))

    def sigma(self, t: Time) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def f(self, t: Time) -> torch.Tensor:
        return 0.5 * self._slopes[self._interval(_t64(t))]

    def g2(self, t: Time) -> torch.Tensor:
        return -self._slopes[self._interval(_t64(t))]  # VP: g^2 = beta(t) = -2 f

    def time_of_index(self, k: int) -> float:
        """The time of knot k (original-table index of this schedule)."""
        return (int(k) + 1) / self.T

    def index_of_time(self, t: float) -> int:
        return int(min(max(round(float(t) * self.T - 1.0), 0), self.T - 1))

    def snap(self, t: float) -> float:
        return self.time_of_index(self.index_of_time(t)) if self.quantize else float(t)

    def model_time(self, t: float, batch: int, device) -> torch.Tensor:
        if self.quantize:
            k = self.index_of_time(t)
            return torch.full((batch,), int(self.timestep_map[k]), dtype=torch.long, device=device)
        return torch.full((batch,), float(t) * self.T - 1.0, dtype=torch.float32, device=device)

    def __repr__(self) -> str:
        return f"DiscreteVPSDE({self.schedule!r})"


def sde_of(diffusion, quantize: bool = True) -> SDE:
    """The SDE of a GaussianDiffusion (its discrete VP process) or an SDE itself."""
    if isinstance(diffusion, SDE):
        return diffusion
    schedule = getattr(diffusion, "schedule", None)
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"diffusion must be a fastdiff.GaussianDiffusion or a fastdiff.sde.SDE, "
                        f"got {type(diffusion).__name__}")
    return DiscreteVPSDE(schedule, diffusion.timestep_map.tolist(), quantize=quantize)


# --------------------------------------------------------------------------- parameterisations
def to_x0(prediction: str, out: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """x_0 from an eps / x0 / v output at marginal coefficients (alpha, sigma):
    eps: (x - sigma eps) / alpha; v (= alpha eps - sigma x0, scaled so alpha^2 + sigma^2 = 1
    for VP): x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)."""
    _check_choice("prediction", prediction, PREDICTIONS)
    a, s = _bcast(alpha, x), _bcast(sigma, x)
    if prediction == "x0":
        return out
    if prediction == "eps":
        return (x - s * out) / a
    return (a * x - s * out) / (a * a + s * s)


def to_eps(x0: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    return (x - _bcast(alpha, x) * x0) / _bcast(sigma, x)


def to_score(x0: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """score(x, t) = grad log p_t(x) = -eps / sigma = (alpha x0 - x) / sigma^2 (Tweedie)."""
    return -to_eps(x0, x, alpha, sigma) / _bcast(sigma, x)


# --------------------------------------------------------------------------- training
WEIGHTINGS = ("simple", "likelihood")


class ContinuousTimeLoss:
    """Denoising score matching in continuous time (Song et al. 2021, Eq. 7):

        E_t E_{x0, eps} lambda(t) || s_theta(x_t, t) + eps / sigma_t ||^2,  t ~ U(t_min, 1)

    written in the eps-parameterisation, || s + eps / sigma ||^2 = || eps_theta - eps ||^2 / sigma^2.
    weighting="simple": lambda = sigma^2 (Ho et al.'s L_simple in continuous t);
    weighting="likelihood": lambda = g^2 (Song et al. 2021b, *Maximum likelihood training*),
    for which the weighted loss bounds the negative log-likelihood. The likelihood weight
    g^2 / sigma^2 varies by orders of magnitude in t, so t is drawn from the density
    proportional to it (importance sampling, as Song et al. 2021b, Sec. 5) and the loss is the
    plain eps-MSE at those t: an unbiased estimate of the weighted objective divided by its
    total weight.

    The process is a `DiscreteVPSDE` with `quantize=False`: the network sees the fractional
    timestep t T - 1, so the trained model is also a discrete-time model of its schedule.
    """

    def __init__(self, schedule: NoiseSchedule, weighting: str = "simple", prediction: str = "eps"):
        self.sde = DiscreteVPSDE(schedule, quantize=False)
        self.weighting = _check_choice("weighting", weighting, WEIGHTINGS)
        self.prediction = _check_choice("prediction", prediction, PREDICTIONS)
        t = torch.linspace(self.sde.t_min, 1.0, 20001, dtype=torch.float64)
        if weighting == "likelihood":
            density = self.sde.g2(t) / self.sde.sigma(t) ** 2
            cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                             torch.cumsum(0.5 * (density[1:] + density[:-1]) * torch.diff(t), 0)])
            self._grid, self._cdf = t, cdf / cdf[-1]

    def sample_t(self, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        u = torch.rand(batch, dtype=torch.float64, generator=generator)
        if self.weighting == "simple":
            return self.sde.t_min + u * (1.0 - self.sde.t_min)
        idx = torch.searchsorted(self._cdf, u).clamp(1, self._cdf.numel() - 1)
        c0, c1 = self._cdf[idx - 1], self._cdf[idx]
        frac = (u - c0) / (c1 - c0).clamp(min=1e-300)
        return self._grid[idx - 1] + frac * (self._grid[idx] - self._grid[idx - 1])

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return _bcast(self.sde.alpha(t), x0) * noise - _bcast(self.sde.sigma(t), x0) * x0

    def __call__(self, model, x0: torch.Tensor, t: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None, model_kwargs: Optional[dict] = None,
                 generator: Optional[torch.Generator] = None) -> dict:
        """Per-sample losses {"loss", "mse", "t"} for a batch x0, t in (0, 1] (float64)."""
        batch = x0.shape[0]
        if t is None:
            t = self.sample_t(batch, generator)
        t = t.to(torch.float64).cpu()
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device) \
                if generator is not None and generator.device == x0.device else torch.randn_like(x0)
        x_t = self.sde.marginal(x0, t.to(x0.device), noise)
        model_t = (t * self.sde.T - 1.0).to(device=x0.device, dtype=torch.float32)
        out = model(x_t, model_t, **(model_kwargs or {}))
        if not isinstance(out, torch.Tensor):
            out = getattr(out, "sample", out)
        if tuple(out.shape) != tuple(x0.shape):
            raise ValueError(f"model output shape {tuple(out.shape)} must equal x shape {tuple(x0.shape)} for "
                             "continuous-time training (a learned variance has no continuous-time loss)")
        target = self.target(x0, noise, t.to(x0.device))
        mse = ((out.float() - target.float()) ** 2).mean(dim=tuple(range(1, x0.dim())))
        return {"loss": mse, "mse": mse, "t": t}
