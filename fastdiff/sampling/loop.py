"""`fastdiff.sample`: checks its arguments, picks the timesteps (`spacing`), wraps the model
with its labels and guidance, then runs one sampler:

- DDIM (Song et al.) and ancestral DDPM (Ho et al.), one fused `fastdiff.ops.sampler_step`
  per step, on a respaced subsequence of timesteps whose betas are recomputed from abar
  (GaussianDiffusion.respace), so a learned variance stays right with few steps;
- the continuous-time solvers of `fastdiff.sampling.solvers` (Euler, Heun, DPM-Solver,
  DPM-Solver++, reverse SDE, predictor-corrector, adaptive PF-ODE).

The model always sees original timesteps.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from fastdiff import ops
from fastdiff.diffusion import GaussianDiffusion, _check_choice
from fastdiff.ops.philox import INITIAL_NOISE_STEP
from fastdiff.ops.sampler_step import StepCoefficients
from fastdiff.sampling import guidance
from fastdiff.sampling.solvers import NOISE_STRIDE, SOLVERS, Denoiser, SamplerOptions, make_grid, unwrap_output
from fastdiff.sampling.spacing import SPACINGS, log_snr_targets, space_timesteps, table_indices
from fastdiff.schedule import NoiseSchedule
from fastdiff.sde import SDE, sde_of

SAMPLERS = ("ddim", "ddpm") + tuple(SOLVERS)
#: spacing=None: the sampler's own default (DPM-Solver family: uniform log-SNR; Euler/Heun: Karras)
DEFAULT_SPACING = {"ddim": "uniform", "ddpm": "uniform", **{k: v.default_spacing for k, v in SOLVERS.items()}}


def ddim_sigma(alpha_cumprod: float, alpha_cumprod_prev: float, eta: float) -> float:
    """Eq. 119: sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)."""
    if eta == 0:  # deterministic whatever abar_prev is (a final abar below abar_0 would give 0 * nan)
        return 0.0
    return eta * np.sqrt((1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)) * \
        np.sqrt(1.0 - alpha_cumprod / alpha_cumprod_prev)


def _output_to_x0(d: GaussianDiffusion, i: int):
    """(a1, a2) with x0 = a1 x_t + a2 model_out at (respaced) index i."""
    if d.prediction == "eps":
        return d.sqrt_recip_alphas_cumprod[i].item(), -d.sqrt_recipm1_alphas_cumprod[i].item()
    if d.prediction == "v":
        return d.sqrt_alphas_cumprod[i].item(), -d.sqrt_one_minus_alphas_cumprod[i].item()
    return 0.0, 1.0


def step_coefficients(d: GaussianDiffusion, i: int, sampler: str, eta: float = 0.0) -> StepCoefficients:
    """The fused step's scalars for leaving (respaced) index i of diffusion d."""
    a1, a2 = _output_to_x0(d, i)
    if sampler == "ddim":
        # Eq. 114: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
        # eps recomputed from the (possibly clipped) x0: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
        ac, ac_prev = d.alphas_cumprod[i].item(), d.alphas_cumprod_prev[i].item()
        if i == 0:  # the last step lands on final_alpha_cumprod (1 unless set_alpha_to_one=False)
            ac_prev = d.final_alpha_cumprod
        sigma = ddim_sigma(ac, ac_prev, eta)
        dir_sq = 1.0 - ac_prev - sigma ** 2
        if dir_sq < -1e-12:
            raise ValueError(f"eta={eta} is too large: sigma^2 exceeds 1 - abar_prev at step {i}")
        c2 = np.sqrt(max(dir_sq, 0.0)) / np.sqrt(1.0 - ac)
        c1 = np.sqrt(ac_prev) - c2 * np.sqrt(ac)
        return StepCoefficients(a1, a2, float(c1), float(c2), float(sigma))
    # Ancestral step (Algorithm 2 corrected): posterior mean at the predicted x0 (Eq. 68),
    # the diffusion's variance, and no noise when leaving t = 0.
    c1, c2 = d.posterior_mean_coef1[i].item(), d.posterior_mean_coef2[i].item()
    min_log = d.posterior_log_variance_clipped[i].item()
    max_log = float(np.log(d.betas[i].item()))
    if d.variance == "fixed_small":
        sigma = float(np.exp(0.5 * min_log))
    elif d.variance == "fixed_large":
        sigma = float(np.sqrt(d.large_variance[i].item()))
    else:
        sigma = 1.0  # scales exp(log_var / 2) read from the model's variance channels
    if i == 0:
        sigma = 0.0
    return StepCoefficients(a1, a2, c1, c2, sigma, min_log, max_log)


def _default_device(model):
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _model_dtype(model) -> Optional[torch.dtype]:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def _positive_finite(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _solver_options(sampler: str, eta, s_churn, rtol, atol, snr, corrector_steps, seed: int,
                    sample_offset: int) -> SamplerOptions:
    """Check the sampler-specific options: each is an error for a sampler that would ignore it."""
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not np.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    owners = {"eta": ("ddim", "ddpm"), "s_churn": ("euler", "heun"), "rtol": ("ode",), "atol": ("ode",),
              "snr": ("pc",), "corrector_steps": ("pc",)}
    given = {"eta": eta if eta != 0 else None, "s_churn": s_churn, "rtol": rtol, "atol": atol, "snr": snr,
             "corrector_steps": corrector_steps}
    for name, value in given.items():
        if value is not None and sampler not in owners[name]:
            raise ValueError(f"{name}={value!r} is used only by sampler={' / '.join(map(repr, owners[name]))}, "
                             f"not by sampler={sampler!r}")
    opts = SamplerOptions(seed=seed, sample_offset=sample_offset, eta=float(eta))
    if s_churn is not None:
        if isinstance(s_churn, bool) or not isinstance(s_churn, (int, float)) or not math.isfinite(s_churn) \
                or s_churn < 0:
            raise ValueError(f"s_churn must be a finite number >= 0, got {s_churn!r}")
        opts.s_churn = float(s_churn)
    if rtol is not None:
        opts.rtol = _positive_finite("rtol", rtol)
    if atol is not None:
        opts.atol = _positive_finite("atol", atol)
    if snr is not None:
        opts.snr = _positive_finite("snr", snr)
    if corrector_steps is not None:
        if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or \
                not 0 <= corrector_steps < NOISE_STRIDE:
            raise ValueError(f"corrector_steps must be an int in [0, {NOISE_STRIDE - 1}], got {corrector_steps!r}")
        opts.corrector_steps = corrector_steps
    return opts


def _resolve_process(model, diffusion):
    """(GaussianDiffusion or None, SDE): the model's diffusion unless one is given."""
    if diffusion is None:
        diffusion = getattr(model, "diffusion", None) or GaussianDiffusion(NoiseSchedule.linear(1000))
    if isinstance(diffusion, SDE):
        return None, diffusion
    if not isinstance(diffusion, GaussianDiffusion):
        raise TypeError(f"diffusion must be a fastdiff.GaussianDiffusion or a fastdiff.sde.SDE, "
                        f"got {type(diffusion).__name__}")
    return diffusion, sde_of(diffusion)


def _table_timesteps(model, d: GaussianDiffusion, sampler: str, steps, spacing, timesteps) -> List[int]:
    """The original timesteps a discrete-time model is sampled at, ascending (see `sample`)."""
    originals = d.timestep_map.tolist()
    if timesteps is not None:
        if spacing is not None:
            raise ValueError("give either spacing= or timesteps=, not both")
        try:
            ts = [int(t) for t in timesteps]
        except (TypeError, ValueError):
            raise TypeError(f"timesteps must be a sequence of ints, got {timesteps!r:.80}") from None
        if not ts or len(set(ts)) != len(ts) or any(t not in originals for t in ts):
            raise ValueError(f"timesteps must be distinct original timesteps of the model's diffusion "
                             f"(in [{min(originals)}, {max(originals)}]), got {list(timesteps)[:8]}")
        return sorted(ts)
    if spacing is None:
        spacing = getattr(model, "default_spacing", None) or DEFAULT_SPACING.get(sampler, "uniform")
    if callable(spacing):
        return _table_timesteps(model, d, sampler, steps, None, spacing(steps))
    return [originals[i] for i in table_indices(d.alphas_cumprod, steps, spacing)]


def _sde_times(sde: SDE, sampler: str, steps, spacing, timesteps) -> List[float]:
    """Descending times of a continuous-time process."""
    if timesteps is not None:
        ts = sorted((float(t) for t in timesteps), reverse=True)
        if not ts or any(not sde.t_min <= t <= sde.t_max for t in ts) or len(set(ts)) != len(ts):
            raise ValueError(f"timesteps must be distinct times in [{sde.t_min}, {sde.t_max}] for {sde!r}, "
                             f"got {list(timesteps)[:8]}")
        return ts
    spacing = spacing or DEFAULT_SPACING.get(sampler, "uniform")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if spacing == "uniform":
        return np.linspace(sde.t_max, sde.t_min, steps).tolist()
    if spacing not in ("logsnr", "karras"):
        raise ValueError(f"spacing must be 'uniform', 'logsnr' or 'karras' for a continuous-time {sde!r}, "
                         f"got {spacing!r}")
    lam = log_snr_targets(float(sde.log_snr(sde.t_min)), float(sde.log_snr(sde.t_max)), steps, spacing)
    return sde.t_of_log_snr(lam).tolist()


def _initial_x(model, shape, x_T, n, seed, sample_offset, dtype, device) -> torch.Tensor:
    if x_T is not None:
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
            raise TypeError(f"x_T must be a floating-point tensor, got {type(x_T).__name__}")
        if shape is not None and tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T shape {tuple(x_T.shape)} does not match shape {tuple(shape)}")
        expected = _model_dtype(model)
        if expected is not None and x_T.dtype != expected:
            raise TypeError(f"x_T has dtype {x_T.dtype} but the model's parameters are {expected}: pass x_T.to("
                            f"{expected}) (or convert the model)")
        return x_T.clone()
    if shape is None:
        sample_shape = getattr(model, "sample_shape", None)
        if sample_shape is None:
            raise ValueError("shape is required for a model without a `sample_shape` attribute")
        shape = (n, *sample_shape)
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, np.ndarray)):
        raise TypeError(f"shape must be a sequence (batch, ...) of ints, got {type(shape).__name__} ({shape!r})")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (batch, ...) with positive sizes, got {shape}")
    device = torch.device(device) if device is not None else _default_device(model)
    return ops.randn(shape, seed=seed, step=INITIAL_NOISE_STEP, sample_offset=sample_offset, dtype=dtype,
                     device=device)


def _guided_model(model, x, y, guidance_scale, classifier, classifier_scale, null_label, mean_channels):
    """(model_fn, labels, guidance_scale): the model with its labels and classifier-free guidance."""
    if guidance_scale is None:
        guidance_scale = float(getattr(model, "default_guidance_scale", 0.0)) if y is not None else 0.0
    try:
        w = float(guidance_scale)
    except (TypeError, ValueError):
        w = math.nan
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if classifier is not None and (classifier_scale is None or not np.isfinite(classifier_scale)):
        raise ValueError(f"classifier_scale must be a finite number, got {classifier_scale!r}")
    if y is None:
        if w > 0 or classifier is not None:
            raise ValueError("guidance needs the target labels: pass y=")
        return model, None
    num_classes = getattr(model, "num_classes", None)
    labels = guidance.as_labels(y, x.shape[0], x.device, num_classes)
    if w > 0:
        null = guidance.null_label_of(model, null_label)
        if isinstance(null_label, bool) or (null_label is not None and not isinstance(null_label, (int, np.integer))):
            raise TypeError(f"null_label must be an int, got {type(null_label).__name__} ({null_label!r})")
        if null < 0 or (num_classes is not None and null > num_classes):
            raise ValueError(f"null_label must be in [0, {num_classes if num_classes is not None else 'num_classes'}]"
                             f" (the model's 'no label' index is num_classes), got {null_label!r}")
        return guidance.ClassifierFreeGuidance(model, labels, w, null, mean_channels), labels
    if num_classes is not None:  # a class-conditional model sees the labels
        return functools.partial(model, y=labels), labels
    if classifier is None:
        raise ValueError(f"y={y if isinstance(y, int) else 'tensor'} given, but the model is not class-conditional "
                         "(no `num_classes`) and no classifier= is given: the labels would be ignored")
    return model, labels


@torch.no_grad()
def sample(model: Callable, shape: Optional[Sequence[int]] = None, steps: int = 50, eta: float = 0.0,
           diffusion: Optional[Union[GaussianDiffusion, SDE]] = None, seed: int = 0, spacing=None,
           clip_denoised: Optional[bool] = None, sampler: str = "ddim", x_T: Optional[torch.Tensor] = None,
           n: int = 16, model_kwargs: Optional[dict] = None, progress: bool = False,
           device=None, dtype: torch.dtype = torch.float32, sample_offset: int = 0,
           cuda_graph: bool = False, compile: Optional[str] = None,
           y: Optional[Union[int, torch.Tensor]] = None, guidance_scale: Optional[float] = None,
           classifier: Optional[Callable] = None, classifier_scale: float = 1.0,
           null_label: Optional[int] = None, timesteps: Optional[Sequence] = None,
           s_churn: Optional[float] = None, rtol: Optional[float] = None, atol: Optional[float] = None,
           snr: Optional[float] = None, corrector_steps: Optional[int] = None,
           stats: Optional[dict] = None) -> torch.Tensor:
    """Draw samples with one of `SAMPLERS` (docs/score-based.md for the continuous-time ones).

    model: any callable model(x_t, t, **model_kwargs), t a LongTensor (B,) of original timesteps
        (a float tensor of times for a continuous-time `diffusion=fastdiff.sde.SDE`). A non-tensor
        output with a tensor `.sample` (diffusers' UNet2DOutput) is unwrapped.
    shape: full shape (B, ...) of the batch; omitted for models with `sample_shape`, then
        `n` samples are drawn.
    sampler: "ddim" (Eq. 114, sigma from Eq. 119; eta) | "ddpm" (ancestral, the diffusion's
        variance) -- one fused `ops.sampler_step` per step -- or a continuous-time solver:
        "euler" | "heun" (Karras et al. Alg. 1/2; s_churn) | "dpm_solver_2" | "dpm_solver_3"
        (Lu et al. 2022a, 2 / 3 evaluations per step) | "dpmpp_2m" | "dpmpp_3m" (Lu et al. 2022b)
        | "sde" (reverse SDE, Euler-Maruyama) | "pc" (predictor-corrector; snr, corrector_steps)
        | "ode" (adaptive RK45 on the probability-flow ODE; rtol, atol; `steps` ignored)
        | "unipc" (UniPC-2 bh2, Zhao et al. 2023: predictor + free corrector, one evaluation per step).
        Every solver ends with the first-order step into sigma = 0.
    steps, spacing, timesteps: the sampler visits `steps` timesteps placed by `spacing` ("uniform",
        "leading", "trailing", "quadratic", "logsnr", "karras"; None: the model's `default_spacing`
        (a name or a callable steps -> original timesteps) if it has one, else the sampler's
        default, `DEFAULT_SPACING`), or exactly the original timesteps in `timesteps`.
    seed, sample_offset: the noise of sample i is a function of (seed, sample_offset + i,
        step, element) only, so the first image of a batch equals the image drawn alone
        (for "ode" only up to its tolerance: the step size is chosen for the whole batch).
    cuda_graph / compile (ddim and ddpm only): capture model call + step once as a CUDA graph /
        run the model under torch.compile(mode=compile); see fastdiff/sampling/cuda_graphs.py.
    y: class labels (int or (B,)) for a class-conditional model (`num_classes`) or a classifier.
    guidance_scale: classifier-free guidance w (Ho & Salimans): eps~ = (1 + w) eps(x, y) -
        w eps(x, none); None: the model's `default_guidance_scale` when y is given, else 0.
        The "no label" index is `null_label`, by default model.num_classes.
    classifier, classifier_scale: classifier guidance (Dhariwal & Nichol): eps - s sigma
        grad log p(y | x_t); ancestral sampling shifts the mean by s Sigma grad log p(y | x_t).
    clip_denoised: clamp the predicted x_0 to [-1, 1] (every sampler); None: the model's
        `default_clip_denoised` attribute if it has one (an imported diffusers scheduler's
        clip_sample), else True.
    stats: a dict that receives {"nfe": network evaluations, "timesteps": what was visited}.
    A latent model (fastdiff.models.LatentDiffusionModel: it has `decode_latents`) is sampled in its
    latent space (`shape`, `x_T` and a classifier are of latents) and the decoded images are returned.
    """
    _check_choice("sampler", sampler, SAMPLERS)
    opts = _solver_options(sampler, eta, s_churn, rtol, atol, snr, corrector_steps, seed, sample_offset)
    d, sde = _resolve_process(model, diffusion)
    if clip_denoised is None:
        clip_denoised = bool(getattr(model, "default_clip_denoised", True))
    ts = _visited_timesteps(model, d, sde, sampler, steps, spacing, timesteps)
    x = _initial_x(model, shape, x_T, n, seed, sample_offset, dtype, device)
    if d is None and x_T is None:
        x = sde.prior_sample(x)
    mean_channels = x.shape[1] if d is not None and d.learned_variance else None
    model_fn, labels = _guided_model(model, x, y, guidance_scale, classifier, classifier_scale, null_label,
                                     mean_channels)
    if sampler in ("ddim", "ddpm"):
        index = {t: i for i, t in enumerate(d.timestep_map.tolist())}
        steps_used = d.respace([index[t] for t in ts])
        if stats is not None:
            stats.update(nfe=len(ts), timesteps=list(ts))
        return _decoded(model, _sample_fused(model_fn, x, steps_used, sampler, opts, clip_denoised, model_kwargs,
                                             progress, cuda_graph, compile, classifier, classifier_scale, labels))
    if cuda_graph or compile is not None:
        raise ValueError(f"cuda_graph/compile serve sampler='ddim'/'ddpm' only, got sampler={sampler!r}")
    den = Denoiser(model_fn, sde, d.prediction if d is not None else getattr(model, "prediction", "eps"),
                   model_kwargs, clip_denoised, d.split_output if d is not None else None,
                   classifier, labels, classifier_scale)
    x = SOLVERS[sampler].fn(den, x, _solver_grid(d, sde, sampler, ts), opts)
    if stats is not None:
        stats.update(nfe=den.nfe, timesteps=list(ts))
    return _decoded(model, x)


def _decoded(model, x: torch.Tensor) -> torch.Tensor:
    """The samples as images: a latent model (one with `decode_latents`, e.g.
    fastdiff.models.LatentDiffusionModel) was sampled in its latent space and decodes them."""
    decode = getattr(model, "decode_latents", None)
    return x if decode is None else decode(x)


def _visited_timesteps(model, d, sde, sampler: str, steps, spacing, timesteps) -> list:
    """The timesteps the sampler visits (original table timesteps, or SDE times), checked
    against the sampler's multistep order."""
    if d is not None:
        ts = _table_timesteps(model, d, sampler, steps, spacing, timesteps)
    else:
        if sampler in ("ddim", "ddpm"):
            raise ValueError(f"sampler={sampler!r} needs a discrete-time GaussianDiffusion, got {sde!r}")
        ts = _sde_times(sde, sampler, steps, spacing, timesteps)
    min_steps = SOLVERS[sampler].order if sampler in SOLVERS else 1
    if len(ts) < min_steps:
        raise ValueError(f"sampler={sampler!r} needs steps >= {min_steps} (its multistep order), got {len(ts)}")
    return ts


def _solver_grid(d, sde, sampler: str, ts):
    """The continuous-time solvers' grid: SDE times from high to low noise, ending at the
    diffusion's final alpha-bar (the adaptive "ode" solver needs only the two ends)."""
    if d is not None:
        index = {t: i for i, t in enumerate(d.timestep_map.tolist())}
        times = [sde.time_of_index(index[t]) for t in sorted(ts, reverse=True)]
        final = float(getattr(d, "final_alpha_cumprod", 1.0))
    else:
        times, final = ts, 1.0
    if sampler == "ode":
        times = [times[0], times[-1]]
    return make_grid(sde, times, final)


def _sample_fused(model_fn, x, d, sampler, opts, clip_denoised, model_kwargs, progress, cuda_graph, compile,
                  classifier, classifier_scale, labels):
    """DDIM / ancestral DDPM on the respaced diffusion d: one fused `ops.sampler_step` per step."""
    seed, sample_offset = opts.seed, opts.sample_offset
    # Every step's scalars up front: nothing is recomputed inside the loop.
    coefs = [step_coefficients(d, i, sampler, opts.eta) for i in range(d.T)]
    # The kernel reads the model's variance channels only for an ancestral step with a
    # learned variance; DDIM's sigma comes from eta, so it is handed the mean channels.
    variance = d.variance if (sampler == "ddpm" and d.learned_variance) else "fixed"
    mean_only = sampler == "ddim" and d.learned_variance
    batch = x.shape[0]
    if classifier is not None and (cuda_graph or compile is not None):
        raise ValueError("classifier guidance needs a gradient per step: use it without cuda_graph/compile")
    if cuda_graph or compile is not None:
        from fastdiff.sampling.cuda_graphs import sample_loop
        return sample_loop(model_fn, x, coefs, d.timestep_map, seed=seed, sample_offset=sample_offset,
                           clip_denoised=clip_denoised, variance=variance, mean_only=mean_only,
                           model_kwargs=model_kwargs, split_output=d.split_output, cuda_graph=cuda_graph,
                           compile=compile)
    indices = range(d.T - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        indices = tqdm(indices, desc=f"{sampler} sampling", total=d.T)
    for i in indices:
        t = torch.full((batch,), int(d.timestep_map[i]), dtype=torch.long, device=x.device)
        out = unwrap_output(model_fn(x, t, **(model_kwargs or {}))).to(x.dtype)
        mean_part, var_part = d.split_output(out, x)  # shape check with a clear message
        grad = None
        if classifier is not None:
            grad = classifier_scale * guidance.classifier_log_prob_grad(classifier, x, t, labels)
            if sampler == "ddim":
                # eps^ = eps - s sqrt(1 - abar) grad, expressed in the model's parameterisation
                # through x0 = a1 x + a2 out (x0 moves by -sqrt((1 - abar) / abar) d_eps)
                ac = d.alphas_cumprod[i].item()
                shift = np.sqrt((1.0 - ac) / ac) * np.sqrt(1.0 - ac) / coefs[i].a2
                mean_part = mean_part + shift * grad
                out = torch.cat([mean_part, var_part], dim=1) if var_part is not None else mean_part
        if grad is not None and sampler == "ddpm":
            # mean + s Sigma grad log p(y | x_t): Sigma is the reverse step's variance
            log_var = d.model_log_variance(torch.full((batch,), i, dtype=torch.long, device=x.device), x, var_part)
            grad = torch.exp(log_var) * grad
        # x is the loop's own buffer (a clone of x_T or fresh noise): update it in place
        ops.sampler_step(x, mean_part if mean_only else out, coefs[i], seed=seed, step=i,
                         sample_offset=sample_offset, clip_denoised=clip_denoised, variance=variance, out=x)
        if grad is not None and sampler == "ddpm":
            x += grad
    return x

def sample_in_batches(model: Callable, n: int, batch_size: int, *, y: Optional[torch.Tensor] = None,
                      seed: int = 0, sample_offset: int = 0, **kwargs) -> Iterator[torch.Tensor]:
    """`n` samples as consecutive batches of at most `batch_size`: batch k is samples
    [k batch_size, (k+1) batch_size) of one `sample(model, n=n, y=y, seed=seed, ...)` call, so
    the concatenation does not depend on `batch_size` (the noise contract: sample i's noise is a
    function of (seed, sample_offset + i, step, element) only). `y`: None or (n,) labels."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if y is not None and (not isinstance(y, torch.Tensor) or tuple(y.shape) != (n,)):
        raise ValueError(f"y must be None or a tensor of shape ({n},), got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        yield sample(model, n=m, y=None if y is None else y[start:start + m], seed=seed,
                     sample_offset=sample_offset + start, **kwargs)
