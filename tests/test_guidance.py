"""Classifier-free and classifier guidance against exact answers from the oracle kit."""
import math

import pytest
import torch

import fastdiff
from fastdiff import GaussianDiffusion, NoiseSchedule, ops
from fastdiff.testing import GaussianMixture

from test_sampling import _check_mixture


@pytest.fixture(scope="module")
def setup():
    schedule = NoiseSchedule.linear(1000)
    mix = GaussianMixture.two_class_2d()
    return schedule, mix, mix.model(schedule), mix.classifier(schedule)


def _unconditional(mix, schedule):
    """The same law's oracle without labels (a model with no `num_classes`)."""
    return GaussianMixture(mix.means, mix.covariances, mix.weights.tolist()).model(schedule)


def test_cfg_with_zero_scale_samples_the_conditional_law(setup):
    schedule, mix, model, _ = setup
    for label in (0, 1):
        x = fastdiff.sample(model, (4096, 2), steps=1000, sampler="ddpm", clip_denoised=False,
                            y=label, guidance_scale=0.0, seed=label)
        _check_mixture(mix.conditional(label), x)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_classifier_guidance_at_scale_one_is_exact_conditioning(setup, sampler):
    """grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t): the unconditional
    oracle plus the exact classifier at s = 1 is the conditional model. DDIM's eps-form is
    exact for any variance. The ancestral mean shift Sigma grad matches the conditional
    model's shift (beta / sqrt(alpha)) grad (Tweedie's formula on both posteriors) when
    Sigma = beta, i.e. fixed_large, up to O(beta); with beta-tilde it under-guides at small t."""
    schedule, mix, _, classifier = setup
    unconditional = _unconditional(mix, schedule)
    d = GaussianDiffusion(schedule, variance="fixed_large")
    x = fastdiff.sample(unconditional, (4096, 2), steps=1000, sampler=sampler, clip_denoised=False, y=1,
                        classifier=classifier, classifier_scale=1.0, seed=3, diffusion=d)
    _check_mixture(mix.conditional(1), x)


def _reference_ddim(mix, schedule, x_T, steps, label, conditional, cfg_scale=0.0, cls_scale=0.0):
    """Float64 DDIM(eta=0) with guidance, written from the equations and the oracle alone."""
    ts = fastdiff.space_timesteps(schedule.T, steps, "uniform")
    ac_all = schedule.alphas_cumprod
    x = x_T.double()
    y = torch.full((x.shape[0],), label)
    null = torch.full_like(y, mix.num_classes)
    for k in range(len(ts) - 1, -1, -1):
        ac = ac_all[ts[k]].item()
        ac_prev = ac_all[ts[k - 1]].item() if k > 0 else 1.0
        abar = torch.full((x.shape[0], 1), ac, dtype=torch.float64)

        def eps_of(labels):
            x0 = mix.posterior_mean(x, abar, y=labels)
            return (x - math.sqrt(ac) * x0) / math.sqrt(1 - ac)

        eps = (1 + cfg_scale) * eps_of(y) - cfg_scale * eps_of(null) if conditional else eps_of(null)
        if cls_scale:
            xg = x.clone().requires_grad_(True)
            lp = mix.class_log_posterior(xg, abar)[:, label].sum()
            (g,) = torch.autograd.grad(lp, xg)
            eps = eps - cls_scale * math.sqrt(1 - ac) * g
        x0 = (x - math.sqrt(1 - ac) * eps) / math.sqrt(ac)
        x = math.sqrt(ac_prev) * x0 + math.sqrt(1 - ac_prev) * eps
    return x


@pytest.mark.parametrize("conditional, cfg_scale, cls_scale", [
    (True, 3.0, 0.0),    # classifier-free
    (False, 0.0, 4.0),   # classifier guidance of an unconditional model
    (True, 2.0, 2.0),    # both, as Dhariwal & Nichol combine a conditional model and a classifier
])
def test_strong_guidance_matches_a_float64_reference(setup, conditional, cfg_scale, cls_scale):
    """Beyond s = 1 the guided score is no noised law's score (noising and tilting do not
    commute), so compare with an independent float64 integration of the same update."""
    schedule, mix, model, classifier = setup
    if not conditional:
        model = _unconditional(mix, schedule)
    x_T = ops.randn((64, 2), seed=5, dtype=torch.float64)
    got = fastdiff.sample(model, steps=50, x_T=x_T, clip_denoised=False, y=0, guidance_scale=cfg_scale,
                          classifier=classifier if cls_scale else None, classifier_scale=cls_scale)
    want = _reference_ddim(mix, schedule, x_T, 50, 0, conditional, cfg_scale, cls_scale)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_ancestral_classifier_guidance_matches_a_float64_reference(setup):
    schedule, mix, _, classifier = setup
    model = _unconditional(mix, schedule)
    s, steps, seed = 3.0, 40, 8
    d = GaussianDiffusion(schedule).respace(fastdiff.space_timesteps(1000, steps))
    got = fastdiff.sample(model, (32, 2), steps=steps, sampler="ddpm", clip_denoised=False, y=1,
                          classifier=classifier, classifier_scale=s, seed=seed, dtype=torch.float64)
    x = ops.philox_normal_reference(32, 2, seed=seed, step=ops.philox.INITIAL_NOISE_STEP)
    for i in range(steps - 1, -1, -1):
        ac, ac_prev, beta = (d.alphas_cumprod[i].item(), d.alphas_cumprod_prev[i].item(), d.betas[i].item())
        abar = torch.full((32, 1), ac, dtype=torch.float64)
        x0 = mix.posterior_mean(x, abar)
        # Eq. 68 posterior mean at the predicted x0, variance beta-tilde (beta-tilde_1 at i = 0)
        mean = (math.sqrt(ac_prev) * beta * x0 + math.sqrt(1 - beta) * (1 - ac_prev) * x) / (1 - ac)
        var = beta * (1 - ac_prev) / (1 - ac) if i > 0 else d.betas[1].item() * (1 - ac) / (1 - d.alphas_cumprod[1].item())
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(mix.class_log_posterior(xg, abar)[:, 1].sum(), xg)
        mean = mean + s * var * g
        z = ops.philox_normal_reference(32, 2, seed=seed, step=i)
        x = mean + (math.sqrt(var) * z if i > 0 else 0.0)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_purity_rises_and_spread_falls_with_scale(setup):
    """Concentric classes: a narrow class 0 inside a broad class 1. Guiding toward class 0
    must concentrate the samples where p(0 | x) is high, more so as the scale grows."""
    schedule = setup[0]
    mix = GaussianMixture([[0.0, 0.0], [0.0, 0.0]], [[0.09, 0.09], [0.36, 0.36]], [0.5, 0.5], classes=[0, 1])
    model, classifier, unconditional = mix.model(schedule), mix.classifier(schedule), _unconditional(mix, schedule)
    x_T = ops.randn((2048, 2), seed=11)
    purity, spread = [], []
    for w in (0.0, 1.0, 3.0, 8.0):
        x = fastdiff.sample(model, steps=100, x_T=x_T, clip_denoised=False, y=0, guidance_scale=w)
        purity.append(mix.class_log_posterior(x.double(), torch.ones(len(x), 1)).exp()[:, 0].mean().item())
        spread.append(torch.cov(x.double().T).trace().item())
        # (1 + w) s(x | y) - w s(x) = s(x) + (1 + w) grad log p(y | x): classifier-free
        # guidance at w is classifier guidance at 1 + w with the exact classifier
        xc = fastdiff.sample(unconditional, steps=100, x_T=x_T, clip_denoised=False, y=0,
                             classifier=classifier, classifier_scale=1.0 + w)
        torch.testing.assert_close(xc, x, rtol=1e-4, atol=1e-5)
    assert all(a < b for a, b in zip(purity, purity[1:])), purity
    assert all(a > b for a, b in zip(spread, spread[1:])), spread
    assert spread[0] == pytest.approx(2 * 0.09, rel=0.1)  # w = 0: the class-0 law itself


def test_learned_variance_guides_the_mean_and_keeps_conditional_variance(setup):
    schedule, mix, model, _ = setup
    seen = {}

    def learned(x, t, y=None):
        eps = model(x, t, y=y)
        seen["y"] = y
        # variance channel: -1 for labelled rows, +1 for "no label" rows
        v = torch.where((y == mix.num_classes).reshape(-1, 1), 1.0, -1.0).to(x.dtype).expand_as(x)
        return torch.cat([eps, v], dim=1)

    learned.num_classes = mix.num_classes
    d = GaussianDiffusion(schedule, variance="learned_range", loss="hybrid")
    d_fixed = GaussianDiffusion(schedule, variance="fixed_small")
    a = fastdiff.sample(learned, (16, 2), steps=20, sampler="ddpm", diffusion=d, clip_denoised=False,
                        y=1, guidance_scale=2.0, seed=2)
    b = fastdiff.sample(model, (16, 2), steps=20, sampler="ddpm", diffusion=d_fixed, clip_denoised=False,
                        y=1, guidance_scale=2.0, seed=2)
    assert seen["y"].shape == (32,)  # both halves in one forward
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # v = -1: beta-tilde, the conditional branch's


def test_guidance_bad_input(setup):
    schedule, mix, model, classifier = setup
    with pytest.raises(ValueError, match="guidance_scale must be"):
        fastdiff.sample(model, (2, 2), steps=3, y=0, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="pass y="):
        fastdiff.sample(model, (2, 2), steps=3, guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"y must be labels in \[0, 1\]"):
        fastdiff.sample(model, (2, 2), steps=3, y=2)
    with pytest.raises(ValueError, match="one label per sample"):
        fastdiff.sample(model, (2, 2), steps=3, y=torch.tensor([0, 1, 0]))
    with pytest.raises(TypeError, match="y must be an int"):
        fastdiff.sample(model, (2, 2), steps=3, y=0.5)
    with pytest.raises(ValueError, match="no label"):
        fastdiff.sample(lambda x, t, y=None: x, (2, 2), steps=3, y=0, guidance_scale=1.0)
    with pytest.raises(ValueError, match="without cuda_graph"):
        fastdiff.sample(model, (2, 2), steps=3, y=0, classifier=classifier, cuda_graph=True)
    with pytest.raises(ValueError, match="classifier must return logits"):
        fastdiff.sample(model, (2, 2), steps=3, y=0, classifier=lambda x, t: x.sum(1))
