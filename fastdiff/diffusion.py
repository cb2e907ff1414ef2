"""Gaussian diffusion: forward process, posteriors, reverse-process parameterisations,
losses and the variational bound (Ho et al. 2020; Nichol & Dhariwal 2021).

Equation numbers refer to the thesis *Diffusion models in depth* (its errata are listed in
docs/design.md). Code index t = 0..T-1 is the papers' t = 1..T.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from fastdiff.schedule import NoiseSchedule, extract

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSSES = ("simple", "hybrid", "vlb")
T_SAMPLERS = ("uniform", "importance")
#: λ of L_hybrid = L_simple + λ L_vlb (Nichol & Dhariwal, Eq. 102).
HYBRID_VLB_WEIGHT = 1e-3
LN2 = math.log(2.0)


def _check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_data(name: str, x) -> torch.Tensor:
    """`x` as a batch of data in [-1, 1]: a floating-point tensor (B, ...) with B >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a floating-point tensor (B, C, H, W) in [-1, 1], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor in [-1, 1], got dtype {x.dtype} (integer images: "
                        f"convert with fastdiff.data.to_model_range)")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (B >= 1, then at least one data dimension), "
                         f"got shape {tuple(x.shape)}")
    return x


def check_model_output(output, x_t: torch.Tensor) -> torch.Tensor:
    """A model's output, refused unless it is a floating-point tensor: an integer or bool output
    would otherwise be cast to x_t's dtype without a word."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the model must return a tensor, got {type(output).__name__}")
    if not output.is_floating_point():
        raise TypeError(f"the model returned a {output.dtype} tensor; a diffusion model's output must be "
                        f"floating point (like x_t, {x_t.dtype})")
    return output


# --------------------------------------------------------------------------- densities
def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_normal_interval(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in both tails.

    Computed on the side of zero where the CDFs are small: for lo > 0 the identity
    Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi) avoids subtracting two numbers near 1.
    """
    flip = lo > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    return log_b + torch.log((-torch.expm1((log_a - log_b).clamp(max=0.0))).clamp(min=1e-300))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                        bins: int = 256) -> torch.Tensor:
    """log p(x) for data on `bins` levels in [-1, 1] under a Gaussian discretised into
    the bins, the outermost bins reaching to +-infinity (Eqs. 95-97). Elementwise, nats."""
    half_width = 1.0 / (bins - 1)
    inv_std = torch.exp(-log_scale)
    centered = x - mean
    upper = torch.where(x > 1.0 - 1e-3, torch.full_like(x, math.inf), (centered + half_width) * inv_std)
    lower = torch.where(x < -1.0 + 1e-3, torch.full_like(x, -math.inf), (centered - half_width) * inv_std)
    return _log_normal_interval(lower, upper)


# --------------------------------------------------------------------------- t samplers
class UniformTimestepSampler:
    """t ~ Uniform{0..T-1}, weight 1."""

    def __init__(self, T: int):
        self.T = T

    def weights(self) -> np.ndarray:
        return np.full(self.T, 1.0 / self.T)

    def sample(self, batch: int, device, generator: Optional[torch.Generator] = None):
        p = torch.as_tensor(self.weights(), dtype=torch.float64)
        # t is drawn on the CPU; a generator for another device (the noise's) is not used here
        cpu_generator = generator if generator is not None and generator.device.type == "cpu" else None
        t = torch.multinomial(p, batch, replacement=True, generator=cpu_generator)
        weights = 1.0 / (self.T * p[t])  # E[w L_t] = mean_t L_t whatever p is
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ImportanceTimestepSampler(UniformTimestepSampler):
    """Eq. 103 (Nichol & Dhariwal): p_t ∝ sqrt(E[L_t^2]) over the last `history` values
    of L_t per t; uniform until every t has a full history (errata), then mixed with
    `uniform_prob` of the uniform law so no t starves."""

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 1e-3):
        super().__init__(T)
        self.history = history
        self.uniform_prob = uniform_prob
        self._losses = np.zeros((T, history), dtype=np.float64)
        self._counts = np.zeros(T, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self._counts == self.history).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.full(self.T, 1.0 / self.T)
        w = np.sqrt(np.mean(self._losses ** 2, axis=-1))
        w /= w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.T

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        for ti, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self._counts[ti] == self.history:
                self._losses[ti, :-1] = self._losses[ti, 1:]
                self._losses[ti, -1] = loss
            else:
                self._losses[ti, self._counts[ti]] = loss
                self._counts[ti] += 1

    def state_dict(self) -> dict:
        return {"losses": torch.from_numpy(self._losses.copy()), "counts": torch.from_numpy(self._counts.copy())}

    def load_state_dict(self, state: dict) -> None:
        self._losses = state["losses"].double().numpy().copy()
        self._counts = state["counts"].long().numpy().copy()


# --------------------------------------------------------------------------- diffusion
class GaussianDiffusion:
    """The forward process q and the Gaussian reverse process p_theta of a schedule.

    prediction: what the model outputs as the mean part, "eps" (Ho et al.), "x0" or "v"
        (v = sqrt(abar) eps - sqrt(1 - abar) x0).
    variance: "fixed_small" (beta-tilde, Eq. 68), "fixed_large" (beta), "learned" (the
        model outputs log sigma^2) or "learned_range" (Eq. 101: v in [-1, 1] interpolates
        log beta and log beta-tilde). Learned variances need 2C output channels, mean first.
    loss: "simple" (Eq. 98), "hybrid" (Eq. 102, the VLB term training only the variance),
        "vlb" (Eq. 81 in bits/dim, everything trained by it).
    t_sampler: "uniform" or "importance" (Eq. 103); defaults to importance for loss="vlb".
    final_alpha_cumprod: the abar a deterministic (DDIM) step lands on when it leaves the first
        timestep, 1 by default (the clean data). diffusers' DDIMScheduler(set_alpha_to_one=False)
        uses abar_0 there instead; samplers read it for that last step only (the posterior
        q(x_{t-1} | x_t, x_0) and the ancestral step keep abar = 1 before t = 0).
    """

    def __init__(self, schedule: NoiseSchedule, prediction: str = "eps", variance: str = "fixed_small",
                 loss: str = "simple", t_sampler: Optional[str] = None,
                 timestep_map: Optional[Sequence[int]] = None, final_alpha_cumprod: float = 1.0):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a fastdiff.NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.prediction = _check_choice("prediction", prediction, PREDICTIONS)
        self.variance = _check_choice("variance", variance, VARIANCES)
        self.loss = _check_choice("loss", loss, LOSSES)
        if loss == "simple" and self.learned_variance:
            raise ValueError(f"loss='simple' cannot train variance={variance!r} (the VLB is what trains a "
                             "learned variance): use loss='hybrid' or loss='vlb'")
        if t_sampler is None:
            t_sampler = "importance" if loss == "vlb" else "uniform"
        self.t_sampler_name = _check_choice("t_sampler", t_sampler, T_SAMPLERS)
        self.t_sampler = (ImportanceTimestepSampler(self.T) if t_sampler == "importance"
                          else UniformTimestepSampler(self.T))
        if timestep_map is None:
            timestep_map = range(self.T)
        self.timestep_map = torch.as_tensor(list(timestep_map), dtype=torch.int64)
        if self.timestep_map.numel() != self.T:
            raise ValueError(f"timestep_map must have T={self.T} entries, got {self.timestep_map.numel()}")
        if (isinstance(final_alpha_cumprod, bool) or not isinstance(final_alpha_cumprod, (int, float))
                or not 0.0 < final_alpha_cumprod <= 1.0):
            raise ValueError(f"final_alpha_cumprod must be a number in (0, 1], got {final_alpha_cumprod!r}")
        self.final_alpha_cumprod = float(final_alpha_cumprod)

        b = schedule.betas
        ac = schedule.alphas_cumprod
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])  # abar = 1 before t = 0
        self.betas = b
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1.0).sqrt()
        # Eq. 68: q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta-tilde)
        self.posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
        # beta-tilde is 0 at t = 0: use the t = 1 value there so the log stays finite
        pv1 = self.posterior_variance[1] if self.T > 1 else b[0]
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv1.reshape(1), self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = b * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * schedule.alphas.sqrt() / (1.0 - ac)
        # fixed_large: sigma^2 = beta, with beta-tilde_1 at t = 0 (as improved-diffusion) so
        # the decoder's variance is the posterior's, not beta_1
        self.large_variance = torch.cat([pv1.reshape(1), b[1:]])
        self._device_tables: Dict[Tuple[str, str], torch.Tensor] = {}

    # -- small helpers ---------------------------------------------------------------
    @property
    def T(self) -> int:
        return self.schedule.T

    @property
    def learned_variance(self) -> bool:
        return self.variance in ("learned", "learned_range")

    def output_channels(self, data_channels: int) -> int:
        """Channels the model must output for data with `data_channels` channels."""
        return 2 * data_channels if self.learned_variance else data_channels

    def _gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        key = (name, str(t.device))
        table = self._device_tables.get(key)
        if table is None:
            table = self._device_tables[key] = getattr(self, name).to(t.device)
        return extract(table, t, like)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timesteps the model sees for (possibly respaced) indices t."""
        key = ("timestep_map", str(t.device))
        table = self._device_tables.get(key)
        if table is None:
            table = self._device_tables[key] = self.timestep_map.to(t.device)
        return table[t]

    def _check_t(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"t must be an integer tensor of shape ({batch},), got {t!r:.80}")
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
        if t.numel() and (t.min() < 0 or t.max() >= self.T):
            raise ValueError(f"t must lie in [0, {self.T - 1}], got values in [{t.min().item()}, {t.max().item()}]")
        return t.long()

    # -- forward process ---------------------------------------------------------------
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)  (Eq. 9)."""
        mean = self._gather("sqrt_alphas_cumprod", t, x0) * x0
        var = self._gather("alphas_cumprod", t, x0).neg().add(1.0).expand_as(x0)
        return mean, var, torch.log(var)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) (Eq. 9)."""
        t = self._check_t(t, x0.shape[0])
        if noise is None:
            noise = torch.randn_like(x0)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
        return (self._gather("sqrt_alphas_cumprod", t, x0) * x0
                + self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0) = N(mu-tilde, beta-tilde)  (Eq. 68) -> (mean, variance, log_variance)."""
        if x0.shape != x_t.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} must equal x_t shape {tuple(x_t.shape)}")
        t = self._check_t(t, x0.shape[0])
        mean = self._gather("posterior_mean_coef1", t, x_t) * x0 + self._gather("posterior_mean_coef2", t, x_t) * x_t
        var = self._gather("posterior_variance", t, x_t).expand_as(x_t)
        log_var = self._gather("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, var, log_var

    # -- parameterisations -------------------------------------------------------------
    def predict_xstart(self, x_t: torch.Tensor, t: torch.Tensor, model_mean: torch.Tensor) -> torch.Tensor:
        """x_0 from the mean part of the model output (Eq. 71 for eps)."""
        if self.prediction == "eps":
            return (self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                    - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * model_mean)
        if self.prediction == "v":
            return (self._gather("sqrt_alphas_cumprod", t, x_t) * x_t
                    - self._gather("sqrt_one_minus_alphas_cumprod", t, x_t) * model_mean)
        return model_mean

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return ((self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0)
                / self._gather("sqrt_recipm1_alphas_cumprod", t, x_t))

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "v":
            return (self._gather("sqrt_alphas_cumprod", t, x0) * noise
                    - self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * x0)
        return x0

    def split_output(self, model_output: torch.Tensor, x_t: torch.Tensor):
        """(mean part, variance part or None) of a model output, checking its type and shape."""
        check_model_output(model_output, x_t)
        channels = self.output_channels(x_t.shape[1]) if x_t.dim() > 1 else None
        expected = (x_t.shape[0], channels, *x_t.shape[2:]) if channels else tuple(x_t.shape)
        if tuple(model_output.shape) != tuple(expected):
            raise ValueError(f"model output shape {tuple(model_output.shape)} does not match {tuple(expected)} "
                             f"expected for x_t {tuple(x_t.shape)} with variance={self.variance!r}")
        if self.learned_variance:
            return model_output[:, : x_t.shape[1]], model_output[:, x_t.shape[1]:]
        return model_output, None

    def model_log_variance(self, t: torch.Tensor, x_t: torch.Tensor, var_part: Optional[torch.Tensor]):
        if self.variance == "fixed_small":
            return self._gather("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        if self.variance == "fixed_large":
            return torch.log(self._gather("large_variance", t, x_t)).expand_as(x_t)
        if self.variance == "learned":
            return var_part
        # Eq. 101 with the errata: v in [-1, 1], weight (v + 1) / 2 on log beta
        min_log = self._gather("posterior_log_variance_clipped", t, x_t)
        max_log = torch.log(self._gather("betas", t, x_t))
        frac = (var_part + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(self, model: Callable, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                        model_kwargs: Optional[dict] = None, model_output: Optional[torch.Tensor] = None) -> dict:
        """p_theta(x_{t-1} | x_t) = N(mean, variance): the posterior mean at the predicted
        x_0 (Eq. 80 rewritten through x_0) and the chosen variance."""
        t = self._check_t(t, x_t.shape[0])
        if model_output is None:
            model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        model_output = check_model_output(model_output, x_t).to(x_t.dtype)
        mean_part, var_part = self.split_output(model_output, x_t)
        log_variance = self.model_log_variance(t, x_t, var_part)
        pred_xstart = self.predict_xstart(x_t, t, mean_part)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(pred_xstart, x_t, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart, "model_output": model_output}

    # -- the variational bound ---------------------------------------------------------
    def vb_terms_bpd(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                     clip_denoised: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-sample L_{t-1} (KL, t > 0) or L_0 (decoder NLL, t = 0), in bits/dim (Eq. 81)."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(None, x_t, t, clip_denoised=clip_denoised, model_output=model_output)
        dims = tuple(range(1, x0.dim()))
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]).mean(dim=dims) / LN2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x0, out["mean"], 0.5 * out["log_variance"]).mean(dim=dims) / LN2
        return torch.where(t == 0, decoder_nll, kl), out["pred_xstart"]

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) per sample, bits/dim: the L_T term."""
        t = torch.full((x0.shape[0],), self.T - 1, dtype=torch.long, device=x0.device)
        mean, _, log_var = self.q_mean_variance(x0, t)
        kl = normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))
        return kl.mean(dim=tuple(range(1, x0.dim()))) / LN2

    def training_losses(self, model: Callable, x0: torch.Tensor, t: Optional[torch.Tensor] = None,
                        noise: Optional[torch.Tensor] = None, model_kwargs: Optional[dict] = None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Per-sample losses for a batch x0 (data in [-1, 1]).

        Returns "loss" (weighted by the t-sampler's importance weights: average it),
        "mse" (Eq. 98), "vb" (L_t in bits/dim, Eq. 81), "t" and "weights". When t is drawn
        here, the importance sampler (Eq. 103) is updated with the batch's L_t.
        """
        batch = check_data("x0", x0).shape[0]
        if noise is not None and (not isinstance(noise, torch.Tensor) or noise.shape != x0.shape
                                  or not noise.is_floating_point()):
            raise ValueError(f"noise must be a floating-point tensor of x0's shape {tuple(x0.shape)}, got "
                             f"{getattr(noise, 'dtype', type(noise).__name__)} {tuple(getattr(noise, 'shape', ()))}")
        draw_t = t is None
        if draw_t:
            t, weights = self.t_sampler.sample(batch, x0.device, generator)
        else:
            t = self._check_t(t, batch)
            weights = torch.ones(batch, device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) \
                if generator is not None else torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        mean_part, var_part = self.split_output(model_output, x_t)
        dims = tuple(range(1, x0.dim()))
        terms: Dict[str, torch.Tensor] = {"t": t, "weights": weights}
        terms["mse"] = ((self.training_target(x0, t, noise) - mean_part.to(x0.dtype)) ** 2).mean(dim=dims)
        if self.loss == "vlb":
            vb, _ = self.vb_terms_bpd(model_output, x0, x_t, t)
            terms["vb"] = vb
            # T * L_t estimates the whole bound; the weights make it unbiased under Eq. 103
            loss = vb * self.T
        else:
            if self.learned_variance:
                # L_hybrid: the VLB term sees a frozen mean, so it trains only the variance
                frozen = torch.cat([mean_part.detach(), var_part], dim=1)
                vb, _ = self.vb_terms_bpd(frozen, x0, x_t, t)
            else:
                with torch.no_grad():
                    vb, _ = self.vb_terms_bpd(model_output.detach(), x0, x_t, t)
            terms["vb"] = vb
            loss = terms["mse"] + (HYBRID_VLB_WEIGHT * self.T * vb if self.loss == "hybrid" else 0.0)
        terms["loss"] = loss * weights
        if draw_t:
            self.t_sampler.update(t, terms["vb"])
        return terms

    @torch.no_grad()
    def nll_bpd(self, model: Callable, x0: torch.Tensor, clip_denoised: bool = True,
                model_kwargs: Optional[dict] = None, generator: Optional[torch.Generator] = None,
                progress: bool = False) -> Dict[str, torch.Tensor]:
        """The full variational bound on -log2 p(x0) per dimension, per sample:
        prior term L_T + every L_{t-1} + the decoder L_0, each with one draw of x_t
        (as improved-diffusion's calc_bpd_loop). Costs T model evaluations.

        Returns "total_bpd" (B,), "prior_bpd" (B,), "vb" (B, T) indexed by t,
        "xstart_mse" (B, T) and "mse" (B, T) of the eps implied by the model.
        """
        batch = check_data("x0", x0).shape[0]
        vb = torch.zeros(batch, self.T, dtype=torch.float64, device=x0.device)
        xstart_mse = torch.zeros_like(vb)
        eps_mse = torch.zeros_like(vb)
        dims = tuple(range(1, x0.dim()))
        steps = range(self.T - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="bits/dim", total=self.T)
        for i in steps:
            t = torch.full((batch,), i, dtype=torch.long, device=x0.device)
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
            x_t = self.q_sample(x0, t, noise)
            model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
            terms, pred_xstart = self.vb_terms_bpd(model_output, x0, x_t, t, clip_denoised=clip_denoised)
            vb[:, i] = terms
            xstart_mse[:, i] = ((pred_xstart - x0) ** 2).mean(dim=dims)
            eps_mse[:, i] = ((self.predict_eps(x_t, t, pred_xstart) - noise) ** 2).mean(dim=dims)
        prior = self.prior_bpd(x0)
        return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb,
                "xstart_mse": xstart_mse, "mse": eps_mse}

    # -- respacing ---------------------------------------------------------------------
    def respace(self, timesteps: Sequence[int]) -> "GaussianDiffusion":
        """The diffusion on a subsequence of timesteps (improved-diffusion's respacing):
        betas recomputed from abar on the subsequence, the model still fed original t."""
        timesteps = sorted(int(s) for s in timesteps)
        if not timesteps or len(set(timesteps)) != len(timesteps) or timesteps[0] < 0 or timesteps[-1] >= self.T:
            raise ValueError(f"timesteps must be distinct integers in [0, {self.T - 1}], got {timesteps[:8]}...")
        ac = self.alphas_cumprod[timesteps]
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        # When a stride spans a destroyed signal (abar ratio below 2**-53), 1 - ratio rounds to
        # beta = 1, which NoiseSchedule refuses (alpha-bar would be 0 and sampling divide by it):
        # keep it at the largest double below 1, the nearest representable value.
        betas = (1.0 - ac / ac_prev).clamp(max=1.0 - 2.0 ** -53)
        mapped = self.timestep_map[timesteps]
        return GaussianDiffusion(NoiseSchedule(betas, name=f"{self.schedule.name}-respaced"),
                                 prediction=self.prediction, variance=self.variance, loss=self.loss,
                                 t_sampler=self.t_sampler_name, timestep_map=mapped.tolist(),
                                 final_alpha_cumprod=self.final_alpha_cumprod)

    def __repr__(self) -> str:
        final = f", final_alpha_cumprod={self.final_alpha_cumprod!r}" if self.final_alpha_cumprod != 1.0 else ""
        return (f"GaussianDiffusion({self.schedule!r}, prediction={self.prediction!r}, "
                f"variance={self.variance!r}, loss={self.loss!r}{final})")
