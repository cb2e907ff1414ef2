"""Samplers: respacing, DDIM (Song et al.) and ancestral DDPM (Ho et al.), one fused
`fastdiff.ops.sampler_step` per step.

Both samplers run on a respaced subsequence of `steps` timesteps whose betas are
recomputed from abar (GaussianDiffusion.respace), so a learned variance stays right with
few steps; the model always sees the original timesteps.
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
from fastdiff.schedule import NoiseSchedule

SPACINGS = ("uniform", "leading", "trailing", "quadratic")
SAMPLERS = ("ddim", "ddpm")


def space_timesteps(T: int, steps: int, spacing: str = "uniform") -> List[int]:
    """`steps` distinct timesteps in [0, T-1], ascending.

    uniform:   round(linspace(0, T-1, steps)), holding both 0 and T-1 (T-1 alone for steps=1)
    leading:   0, r, 2r, ... with r = T // steps (diffusers' "leading")
    trailing:  round(T - k T / steps) - 1 for k < steps, ending at T-1 (diffusers' "trailing")
    quadratic: int(linspace(0, sqrt(0.8 T), steps)^2) (Song et al.'s DDIM code)
    """
    _check_choice("spacing", spacing, SPACINGS)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {type(steps).__name__} ({steps!r})")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, T={T}], got {steps}")
    if spacing == "uniform":
        ts = [T - 1] if steps == 1 else np.round(np.linspace(0, T - 1, steps)).astype(np.int64).tolist()
    elif spacing == "leading":
        ts = (np.arange(steps) * (T // steps)).tolist()
    elif spacing == "trailing":
        ts = (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)[:steps].tolist()
    else:
        ts = (np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(np.int64).tolist()
        if len(set(ts)) != steps:
            raise ValueError(f"spacing='quadratic' gives repeated timesteps for steps={steps} with T={T}; "
                             f"use at most about {int(np.sqrt(0.8 * T))} steps or another spacing")
    return sorted(set(int(t) for t in ts))


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


@torch.no_grad()
def sample(model: Callable, shape: Optional[Sequence[int]] = None, steps: int = 50, eta: float = 0.0,
           diffusion: Optional[GaussianDiffusion] = None, seed: int = 0,
           spacing: Optional[Union[str, Callable[[int], Sequence[int]]]] = None,
           clip_denoised: Optional[bool] = None, sampler: str = "ddim", x_T: Optional[torch.Tensor] = None,
           n: int = 16, model_kwargs: Optional[dict] = None, progress: bool = False,
           device=None, dtype: torch.dtype = torch.float32, sample_offset: int = 0,
           cuda_graph: bool = False, compile: Optional[str] = None,
           y: Optional[Union[int, torch.Tensor]] = None, guidance_scale: Optional[float] = None,
           classifier: Optional[Callable] = None, classifier_scale: float = 1.0,
           null_label: Optional[int] = None) -> torch.Tensor:
    """Draw samples by DDIM (Eq. 114, sigma from Eq. 119) or ancestral DDPM.

    model: any callable model(x_t, t, **model_kwargs), t a LongTensor (B,) of original timesteps.
    shape: full shape (B, ...) of the batch; omitted for models with `sample_shape`, then
        `n` samples are drawn.
    eta: DDIM stochasticity (0 = deterministic); ignored by sampler="ddpm".
    spacing: a spacing name (space_timesteps) or a callable steps -> original timesteps; None: the
        model's `default_spacing` attribute if it has one, else "uniform".
    clip_denoised: clamp the predicted x_0 to [-1, 1]; None: the model's `default_clip_denoised`
        attribute if it has one (an imported diffusers scheduler's clip_sample), else True.
    seed, sample_offset: the noise of sample i is a function of (seed, sample_offset + i,
        step, element) only, so the first image of a batch equals the image drawn alone.
    cuda_graph: capture model call + step once as a CUDA graph and replay it for every step
        (CUDA tensors only; ValueError on CPU). compile: a torch.compile mode for the model,
        e.g. "reduce-overhead". Same samples as the plain loop; see fastdiff/sampling/cuda_graphs.py.
    y: class labels (int or (B,)): passed to the model as `y=` when it is class-conditional
        (has a `num_classes` attribute that is not None), and the classifier's target.
    guidance_scale: classifier-free guidance w (Ho & Salimans): eps~ = (1 + w) eps(x, y) -
        w eps(x, none); 0 samples p(x | y). None: the model's `default_guidance_scale` when y
        is given (a trained class-conditional model's, see TrainConfig.guidance_scale), else 0.
        The "no label" index is `null_label`, by default model.num_classes.
    classifier, classifier_scale: classifier guidance (Dhariwal & Nichol) toward y with a
        time-conditioned classifier(x_t, t) -> logits: DDIM uses eps - s sqrt(1 - abar)
        grad log p(y | x_t); ancestral sampling shifts the mean by s Sigma grad log p(y | x_t).
    """
    _check_choice("sampler", sampler, SAMPLERS)
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not np.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if diffusion is None:
        diffusion = getattr(model, "diffusion", None) or GaussianDiffusion(NoiseSchedule.linear(1000))
    if not isinstance(diffusion, GaussianDiffusion):
        raise TypeError(f"diffusion must be a fastdiff.GaussianDiffusion, got {type(diffusion).__name__}")
    if clip_denoised is None:
        clip_denoised = bool(getattr(model, "default_clip_denoised", True))
    if spacing is None:  # the model's (an imported diffusers scheduler's), else uniform
        spacing = getattr(model, "default_spacing", None) or "uniform"
    timesteps = list(spacing(steps)) if callable(spacing) else space_timesteps(diffusion.T, steps, spacing)
    d = diffusion.respace(timesteps)
    if x_T is not None:
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
            raise TypeError(f"x_T must be a floating-point tensor, got {type(x_T).__name__}")
        if shape is not None and tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T shape {tuple(x_T.shape)} does not match shape {tuple(shape)}")
        x = x_T.clone()
    else:
        if shape is None:
            sample_shape = getattr(model, "sample_shape", None)
            if sample_shape is None:
                raise ValueError("shape is required for a model without a `sample_shape` attribute")
            shape = (n, *sample_shape)
        shape = tuple(int(s) for s in shape)
        if len(shape) < 1 or any(s < 1 for s in shape):
            raise ValueError(f"shape must be (batch, ...) with positive sizes, got {shape}")
        device = torch.device(device) if device is not None else _default_device(model)
        x = ops.randn(shape, seed=seed, step=INITIAL_NOISE_STEP, sample_offset=sample_offset,
                      dtype=dtype, device=device)
    # Every step's scalars up front: nothing is recomputed inside the loop.
    coefs = [step_coefficients(d, i, sampler, eta) for i in range(d.T)]
    # The kernel reads the model's variance channels only for an ancestral step with a
    # learned variance; DDIM's sigma comes from eta, so it is handed the mean channels.
    variance = d.variance if (sampler == "ddpm" and d.learned_variance) else "fixed"
    mean_only = sampler == "ddim" and d.learned_variance
    batch = x.shape[0]
    model_fn = model
    if guidance_scale is None:
        guidance_scale = float(getattr(model, "default_guidance_scale", 0.0)) if y is not None else 0.0
    try:
        w = float(guidance_scale)
    except (TypeError, ValueError):
        w = math.nan
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    guidance_scale = w
    if classifier is not None and (classifier_scale is None or not np.isfinite(classifier_scale)):
        raise ValueError(f"classifier_scale must be a finite number, got {classifier_scale!r}")
    if y is not None:
        num_classes = getattr(model, "num_classes", None)
        labels = guidance.as_labels(y, batch, x.device, num_classes)
        if guidance_scale > 0:
            model_fn = guidance.ClassifierFreeGuidance(model, labels, guidance_scale,
                                                       guidance.null_label_of(model, null_label),
                                                       x.shape[1] if d.learned_variance else None)
        elif num_classes is not None:  # a class-conditional model sees the labels
            model_fn = functools.partial(model, y=labels)
    elif guidance_scale > 0 or classifier is not None:
        raise ValueError("guidance needs the target labels: pass y=")
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
        out = model_fn(x, t, **(model_kwargs or {}))
        if not isinstance(out, torch.Tensor) and isinstance(getattr(out, "sample", None), torch.Tensor):
            out = out.sample  # diffusers' UNet2DOutput
        out = out.to(x.dtype)
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
