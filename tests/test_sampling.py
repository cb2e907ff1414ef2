"""Samplers against the oracle kit: they must reproduce laws we know exactly."""
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import GaussianDiffusion, NoiseSchedule, ops
from fastdiff.sampling import space_timesteps
from fastdiff.testing import FiniteImageSet, GaussianMixture


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule.linear(1000)


# --------------------------------------------------------------------------- spacing
def test_spacings():
    assert space_timesteps(1000, 10, "uniform") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, 10, "leading") == list(range(0, 1000, 100))
    assert space_timesteps(1000, 10, "trailing") == list(range(99, 1000, 100))
    quad = space_timesteps(1000, 10, "quadratic")
    assert quad[0] == 0 and 799 <= quad[-1] <= 800 and len(quad) == 10
    gaps = np.diff(quad)
    assert (np.diff(gaps) > 0).all()  # quadratically growing gaps
    assert space_timesteps(1000, 1000, "uniform") == list(range(1000))
    assert space_timesteps(1000, 1, "uniform") == [999]
    for spacing in ["uniform", "leading", "trailing"]:
        for steps in [1, 7, 50, 333, 999, 1000]:
            ts = space_timesteps(1000, steps, spacing)
            assert len(ts) == steps and ts == sorted(set(ts)) and 0 <= ts[0] and ts[-1] <= 999


def test_respacing_keeps_alphas_cumprod_and_maps_timesteps(linear):
    d = GaussianDiffusion(linear)
    ts = space_timesteps(1000, 25, "trailing")
    r = d.respace(ts)
    torch.testing.assert_close(r.alphas_cumprod, linear.alphas_cumprod[ts])
    assert r.timestep_map.tolist() == ts
    assert r.alphas_cumprod_prev[0].item() == 1.0  # abar = 1 before t = 0
    full = d.respace(range(1000))
    torch.testing.assert_close(full.betas, linear.betas)
    # respacing twice composes the maps
    rr = r.respace([0, 5, 24])
    assert rr.timestep_map.tolist() == [ts[0], ts[5], ts[24]]


# --------------------------------------------------------------------------- mixture
def _check_mixture(mix: GaussianMixture, x: torch.Tensor, allowance: float = 0.0):
    """Weights, means and covariances of samples assigned to components, against the
    law's own, with tolerances from the standard errors (n = len(x)). `allowance`: a bound on
    a per-sample perturbation of the samples (a low-precision network's rounding), which moves
    a mean by <= a and a covariance entry by <= 2 a sigma_max + a^2."""
    n = x.shape[0]
    resp = mix.responsibilities(x)
    label = resp.argmax(1)
    # the components barely overlap: nearly every sample is assigned confidently
    assert (resp.max(1).values > 0.99).float().mean() > 0.97
    for k in range(len(mix.weights)):
        w = mix.weights[k].item()
        frac = (label == k).double().mean().item()
        assert abs(frac - w) < 5 * math.sqrt(w * (1 - w) / n), (k, frac, w)
        xs = x[label == k].double()
        nk = xs.shape[0]
        cov = mix.covariances[k]
        se_mean = (cov.diagonal() / nk).sqrt()
        assert ((xs.mean(0) - mix.means[k]).abs() < 5 * se_mean + 2e-3 + allowance).all(), \
            (k, xs.mean(0), mix.means[k])
        emp = torch.cov(xs.T)
        # sd of a sample covariance entry: sqrt((S_ij^2 + S_ii S_jj) / n)
        se_cov = ((cov ** 2 + torch.outer(cov.diagonal(), cov.diagonal())) / nk).sqrt()
        cov_allowance = 2 * allowance * cov.diagonal().max().sqrt().item() + allowance ** 2
        assert ((emp - cov).abs() < 5 * se_cov + 2e-4 + cov_allowance).all(), (k, emp, cov)


@pytest.mark.parametrize("sampler, prediction", [("ddim", "eps"), ("ddpm", "eps"), ("ddim", "v"), ("ddpm", "x0")])
def test_1000_steps_reproduce_the_mixture(linear, sampler, prediction):
    mix = GaussianMixture.three_component_2d()
    d = GaussianDiffusion(linear, prediction=prediction)
    x = fastdiff.sample(mix.model(linear, prediction), (4096, 2), steps=1000, diffusion=d, seed=11,
                        clip_denoised=False, sampler=sampler)
    _check_mixture(mix, x)


def test_respaced_ancestral_sampling_with_cosine_schedule():
    schedule = NoiseSchedule.cosine(1000)
    mix = GaussianMixture.three_component_2d()
    d = GaussianDiffusion(schedule, variance="fixed_large")
    x = fastdiff.sample(mix.model(schedule), (4096, 2), steps=250, diffusion=d, seed=5, clip_denoised=False,
                        sampler="ddpm", spacing="trailing")
    _check_mixture(mix, x)


def _gaussian_ddim_error(steps: int, linear) -> float:
    """W2 distance between DDIM(eta=0)'s output law and the data law N(mu, Sigma).

    For Gaussian data the oracle denoiser is affine, so the whole deterministic sampler
    is an affine map f(x) = A x + b; run it on 0 and the unit vectors to read A and b,
    push the exact law of x_T through it, and compare Gaussians in closed form. No
    sampling noise: the error is the discretisation error alone.
    """
    mu = torch.tensor([0.3, -0.4], dtype=torch.float64)
    r = torch.tensor([[0.8, 0.6], [-0.6, 0.8]], dtype=torch.float64)
    cov = r @ torch.diag(torch.tensor([0.25, 0.01], dtype=torch.float64)) @ r.T
    law = GaussianMixture(mu[None], cov[None])
    d = GaussianDiffusion(linear)
    probes = torch.cat([torch.zeros(1, 2), torch.eye(2)]).double()
    out = fastdiff.sample(law.model(linear), (3, 2), steps=steps, diffusion=d, x_T=probes,
                          clip_denoised=False, sampler="ddim", eta=0.0)
    b = out[0]
    A = (out[1:] - b).T
    ac_T = linear.alphas_cumprod[-1].item()
    m_T = math.sqrt(ac_T) * mu  # the exact law of x_T under q
    S_T = ac_T * cov + (1 - ac_T) * torch.eye(2, dtype=torch.float64)
    m_out, S_out = A @ m_T + b, A @ S_T @ A.T
    # W2^2 between Gaussians: |m1 - m2|^2 + tr(S1 + S2 - 2 (S2^1/2 S1 S2^1/2)^1/2)
    e, U = torch.linalg.eigh(cov)
    root = U @ torch.diag(e.sqrt()) @ U.T
    e2, U2 = torch.linalg.eigh(root @ S_out @ root)
    cross = (U2 @ torch.diag(e2.clamp(min=0).sqrt()) @ U2.T).trace()
    w2_sq = (m_out - mu).pow(2).sum() + (cov.trace() + S_out.trace() - 2 * cross)
    return math.sqrt(max(w2_sq.item(), 0.0))


def test_ddim_error_shrinks_with_steps(linear):
    errors = [_gaussian_ddim_error(s, linear) for s in (10, 100, 1000)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.01 and errors[0] > 3 * errors[2]


# --------------------------------------------------------------------------- determinism
def test_first_image_of_batch_equals_image_alone(linear):
    data = FiniteImageSet.random(K=5, shape=(3, 8, 8), seed=1)
    model = data.model(linear)
    batch = fastdiff.sample(model, (64, 3, 8, 8), steps=20, seed=7, sampler="ddpm")
    alone = fastdiff.sample(model, (1, 3, 8, 8), steps=20, seed=7, sampler="ddpm")
    torch.testing.assert_close(batch[:1], alone, rtol=1e-5, atol=1e-5)
    shifted = fastdiff.sample(model, (4, 3, 8, 8), steps=20, seed=7, sampler="ddpm", sample_offset=60)
    torch.testing.assert_close(batch[60:], shifted, rtol=1e-5, atol=1e-5)


def test_x_T_and_default_noise_agree(linear):
    data = FiniteImageSet.random(K=3, shape=(2, 4, 4), seed=2)
    x_T = ops.randn((6, 2, 4, 4), seed=3)
    a = fastdiff.sample(data.model(linear), (6, 2, 4, 4), steps=10, seed=3)
    b = fastdiff.sample(data.model(linear), steps=10, seed=99, x_T=x_T)  # eta=0: seed unused
    torch.testing.assert_close(a, b)
    # with clipping and a finite image set, 10 DDIM steps land on the images' grid values
    dist, _ = data.nearest(a)
    assert dist.max() < 0.05


def test_model_with_sample_shape_and_n(linear):
    data = FiniteImageSet.random(K=3, shape=(1, 4, 4), seed=2)
    x = fastdiff.sample(data.model(linear), steps=5, n=3)
    assert x.shape == (3, 1, 4, 4)


def test_learned_range_at_minus_one_equals_fixed_small(linear):
    """A learned_range model that always outputs v = -1 has variance beta-tilde on the
    respaced process: ancestral sampling must match fixed_small exactly."""
    data = FiniteImageSet.random(K=4, shape=(2, 4, 4), seed=3)
    oracle = data.model(linear)

    def learned(x, t):
        eps = oracle(x, t)
        return torch.cat([eps, torch.full_like(eps, -1.0)], dim=1)

    d_fixed = GaussianDiffusion(linear, variance="fixed_small")
    d_learned = GaussianDiffusion(linear, variance="learned_range", loss="hybrid")
    kw = dict(steps=30, seed=4, sampler="ddpm", clip_denoised=True)
    a = fastdiff.sample(oracle, (8, 2, 4, 4), diffusion=d_fixed, **kw)
    b = fastdiff.sample(learned, (8, 2, 4, 4), diffusion=d_learned, **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # DDIM ignores the variance channels
    c = fastdiff.sample(oracle, (8, 2, 4, 4), diffusion=d_fixed, steps=30, seed=4, eta=0.5)
    e = fastdiff.sample(learned, (8, 2, 4, 4), diffusion=d_learned, steps=30, seed=4, eta=0.5)
    torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def _textbook_ddpm(model, schedule, x_T, seed, steps):
    """Ho et al.'s Algorithm 2 written out in float64 on the respaced timesteps (beta_i =
    1 - abar_i / abar_{i-1}), clipped x0, posterior variance beta-tilde, and the same noise
    stream: z of step i is Philox stream (seed, sample, i) -- independent of the fused op."""
    from fastdiff.ops import philox_normal_reference

    ts = space_timesteps(schedule.T, steps)
    abar = schedule.alphas_cumprod[ts].to(torch.float64)
    x = x_T.to(torch.float64)
    batch = x.shape[0]
    for i in reversed(range(steps)):
        ab, ab_prev = abar[i], (abar[i - 1] if i > 0 else torch.tensor(1.0, dtype=torch.float64))
        beta = 1 - ab / ab_prev
        eps = model(x.float(), torch.full((batch,), ts[i], dtype=torch.long)).to(torch.float64)
        x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
        mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x
        if i > 0:
            z = philox_normal_reference(batch, x[0].numel(), seed=seed, step=i).reshape(x.shape)
            x = mean + (beta * (1 - ab_prev) / (1 - ab)).sqrt() * z
        else:
            x = mean
    return x.float()


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_backends_sample_the_textbook_ddpm(linear, backend):
    """Every backend's ancestral sampler equals Algorithm 2 written out by hand (the reference
    backend used to be compared with itself)."""
    data = FiniteImageSet.random(K=4, shape=(3, 4, 4), seed=5)
    model = data.model(linear)
    with ops.use_backend(backend):
        x = fastdiff.sample(model, (4, 3, 4, 4), steps=10, seed=1, sampler="ddpm")
    x_T = ops.randn((4, 3, 4, 4), seed=1)
    expected = _textbook_ddpm(model, linear, x_T, seed=1, steps=10)
    torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- bad input
def test_bad_arguments(linear):
    data = FiniteImageSet.random(K=2, shape=(1, 2, 2), seed=0)
    model = data.model(linear)
    cases = [
        (dict(steps=1001), ValueError, r"steps must be in \[1, T=1000\]"),
        (dict(steps=0), ValueError, "steps must be in"),
        (dict(steps=2.5), TypeError, "steps must be an int"),
        (dict(eta=-0.1), ValueError, "eta must be a finite number >= 0"),
        (dict(eta=float("nan")), ValueError, "eta must be"),
        (dict(spacing="linear"), ValueError, "spacing must be one of"),
        (dict(sampler="euler_a"), ValueError, "sampler must be one of"),
        (dict(x_T=torch.zeros(2, 1, 3, 3), shape=(2, 1, 2, 2)), ValueError, "x_T shape"),
        (dict(diffusion="linear"), TypeError, "diffusion must be"),
        (dict(shape=(0, 1, 2, 2)), ValueError, "positive sizes"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            fastdiff.sample(model, **{"steps": 5, **kwargs})
    with pytest.raises(ValueError, match="model output shape"):
        fastdiff.sample(lambda x, t: torch.zeros(2, 3), (2, 2), steps=3)
    with pytest.raises(ValueError, match="shape is required"):
        fastdiff.sample(lambda x, t: x, steps=3)
    with pytest.raises(ValueError, match="quadratic"):
        space_timesteps(1000, 900, "quadratic")
    with pytest.raises(ValueError, match="T must be >= 1"):
        NoiseSchedule.linear(-3)
