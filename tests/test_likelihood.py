"""Likelihood through the probability-flow ODE (#13): exact divergence against the mixture's exact
density, Hutchinson covering it, and on the finite image set exact NLL <= ODE bits/dim < VLB."""
import math

import pytest
import torch

import fastdiff
from fastdiff.sampling.likelihood import ode_log_likelihood, ode_nll_bpd
from fastdiff.sde import VPSDE
from fastdiff.testing import FiniteImageSet, GaussianMixture

pytest.importorskip("scipy")
T_MIN = 1e-3


@pytest.fixture(scope="module")
def mixture_points():
    mix = GaussianMixture.three_component_2d()
    sde = VPSDE()
    g = torch.Generator().manual_seed(0)
    x0 = mix.sample(6, generator=g)
    x = sde.marginal(x0, T_MIN, torch.randn(x0.shape, generator=g, dtype=torch.float64))  # a draw at t_min
    return mix, sde, x


def test_exact_divergence_matches_the_exact_log_density(mixture_points):
    mix, sde, x = mixture_points
    res = ode_log_likelihood(mix.model(sde), x, diffusion=sde, divergence="exact", rtol=1e-6, atol=1e-8)
    exact = mix.log_prob(x, alpha_cumprod=float(sde.alpha(T_MIN)) ** 2)
    per_dim = (res["log_prob"] - exact).abs() / 2
    assert per_dim.max().item() < 0.01, (res["log_prob"], exact)


def test_hutchinson_covers_the_exact_value(mixture_points):
    mix, sde, x = mixture_points
    point = x[:1].expand(96, 2).clone()   # one point, 96 independent probes (one per sample index)
    exact = mix.log_prob(x[:1], alpha_cumprod=float(sde.alpha(T_MIN)) ** 2).item()
    for noise in ("gaussian", "rademacher"):
        est = ode_log_likelihood(mix.model(sde), point, diffusion=sde, divergence="hutchinson", noise=noise,
                                 rtol=1e-5, atol=1e-7, seed=3)["log_prob"]
        half = 4 * est.std().item() / math.sqrt(est.numel())
        assert abs(est.mean().item() - exact) <= half + 1e-3, (noise, est.mean().item(), half, exact)
        assert est.std().item() > 0  # a real estimator, not the exact trace


def test_ode_bits_per_dim_lies_between_the_exact_nll_and_the_vlb():
    """E_u[ODE bpd] >= the exact NLL (dequantisation + Jensen: the bound holds on average over u, not
    per draw) and below the variational bound. t_min = 5e-5 puts sigma near the bin's own
    spread (2/255 / sqrt(12)), where the bound is tightest: about 0.25 bits/dim above exact."""
    images = FiniteImageSet.random(4, (1, 2, 2), seed=1)
    x0 = images.images.repeat(8, 1, 1, 1)          # 8 dequantisation draws per image
    sde = VPSDE()
    ode = ode_nll_bpd(images.model(sde), x0, diffusion=sde, divergence="exact", t_min=5e-5, rtol=1e-4,
                      atol=1e-5, generator=torch.Generator().manual_seed(0))["total_bpd"]
    linear = fastdiff.NoiseSchedule.linear(250)
    vlb = fastdiff.GaussianDiffusion(linear).nll_bpd(images.model(linear), images.images,
                                                     generator=torch.Generator().manual_seed(0))["total_bpd"]
    exact = images.exact_nll_bpd()
    se = ode.std().item() / math.sqrt(ode.numel())
    assert ode.mean().item() >= exact - 2 * se, (ode.mean(), se, exact)
    assert ode.mean().item() + 3 * se < vlb.mean().item(), (ode.mean(), se, vlb)


def test_likelihood_bad_input(mixture_points):
    mix, sde, x = mixture_points
    model = mix.model(sde)
    with pytest.raises(ValueError, match="divergence must be one of"):
        ode_log_likelihood(model, x, diffusion=sde, divergence="trace")
    with pytest.raises(ValueError, match="rtol must be a finite number > 0, got nan"):
        ode_log_likelihood(model, x, diffusion=sde, rtol=math.nan)
    with pytest.raises(ValueError, match="t_min must be in"):
        ode_log_likelihood(model, x, diffusion=sde, t_min=0.0)
    with pytest.raises(ValueError, match="diffusion is required"):
        ode_log_likelihood(lambda x, t: x, x)
