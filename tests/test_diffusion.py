"""GaussianDiffusion against closed forms, independent computations and the oracle kit."""
import math

import mpmath
import pytest
import torch
from scipy import stats

from fastdiff import GaussianDiffusion, NoiseSchedule
from fastdiff.diffusion import (ImportanceTimestepSampler, discretized_gaussian_log_likelihood,
                                normal_kl)
from fastdiff.testing import FiniteImageSet


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule.linear(1000)


def test_q_sample_marginals(linear):
    d = GaussianDiffusion(linear)
    x0 = torch.tensor([[0.7, -0.3, 0.0]], dtype=torch.float64).expand(200_000, 3)
    for t_val in [0, 250, 999]:
        t = torch.full((x0.shape[0],), t_val)
        x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(t_val),
                                            dtype=torch.float64))
        ac = math.prod(1 - b for b in linear.betas[: t_val + 1].tolist())  # Eq. 9, independently
        n = x0.shape[0]
        sd = math.sqrt(1 - ac)
        assert torch.allclose(x_t.mean(0), math.sqrt(ac) * x0[0], atol=5 * sd / math.sqrt(n))
        assert torch.allclose(x_t.var(0), torch.full((3,), 1 - ac, dtype=torch.float64),
                              rtol=5 * math.sqrt(2 / n))


def test_q_posterior_matches_bayes(linear):
    """q(x_{t-1} | x_t, x_0) by Bayes: prior N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) for
    x_{t-1}, likelihood N(x_t; sqrt(alpha_t) x_{t-1}, beta_t); multiply the Gaussians."""
    d = GaussianDiffusion(linear)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, generator=g, dtype=torch.float64)
    x_t = torch.randn(5, 4, generator=g, dtype=torch.float64)
    for t_val in [1, 2, 100, 999]:
        t = torch.full((5,), t_val)
        mean, var, log_var = d.q_posterior(x0, x_t, t)
        beta = linear.betas[t_val].item()
        ac_prev = math.prod(1 - b for b in linear.betas[:t_val].tolist())
        precision = 1 / (1 - ac_prev) + (1 - beta) / beta
        expected_mean = (math.sqrt(ac_prev) * x0 / (1 - ac_prev) + math.sqrt(1 - beta) * x_t / beta) / precision
        torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(var, torch.full_like(var, 1 / precision), rtol=1e-9, atol=0)
        torch.testing.assert_close(log_var, torch.full_like(var, -math.log(precision)), rtol=1e-9, atol=1e-9)
    # at t = 0 the posterior is the point x0 (its log-variance is clipped to beta-tilde_1)
    mean, var, log_var = d.q_posterior(x0, x_t, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all() and torch.isfinite(log_var).all()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterisations_round_trip(linear, prediction):
    d = GaussianDiffusion(linear, prediction=prediction)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64).unbind(0)
    t = torch.tensor([0, 17, 400, 998, 999, 5])
    x_t = d.q_sample(x0, t, noise)
    target = d.training_target(x0, t, noise)
    torch.testing.assert_close(d.predict_xstart(x_t, t, target), x0, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(d.predict_eps(x_t, t, x0), noise, rtol=1e-7, atol=1e-6)

    def perfect(x, t_model):
        return target

    losses = d.training_losses(perfect, x0, t=t, noise=noise)
    assert losses["mse"].abs().max() < 1e-18


def test_normal_kl_against_torch_distributions():
    g = torch.Generator().manual_seed(2)
    m1, m2, lv1, lv2 = torch.randn(4, 100, generator=g, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_discretized_gaussian_decoder():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    for mean, log_scale in [(0.0, math.log(0.1)), (0.93, math.log(0.02)), (-1.2, math.log(0.3)),
                            (0.5, math.log(1e-4)), (9.0, math.log(0.5))]:
        lp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                 torch.full_like(levels, log_scale))
        # a distribution over the 256 levels (Eqs. 95-97)
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
        # each interior bin is the Gaussian mass of [x - 1/255, x + 1/255], computed
        # independently at 50 digits (plain float64 CDF differences cancel in the tails)
        scale = math.exp(log_scale)
        mpmath.mp.dps = 50
        for k in [1, 100, 200, 254]:
            x = levels[k].item()
            lo = (x - mpmath.mpf(1) / 255 - mean) / scale
            hi = (x + mpmath.mpf(1) / 255 - mean) / scale
            mass = mpmath.ncdf(hi) - mpmath.ncdf(lo) if lo < 0 else mpmath.ncdf(-lo) - mpmath.ncdf(-hi)
            assert lp[k].item() == pytest.approx(float(mpmath.log(mass)), rel=1e-9, abs=1e-9)
        assert lp[0].item() == pytest.approx(stats.norm.logcdf(-1 + 1 / 255, mean, scale), rel=1e-6)
        assert lp[255].item() == pytest.approx(stats.norm.logsf(1 - 1 / 255, mean, scale), rel=1e-6)


def test_learned_range_interpolates_log_betas(linear):
    d = GaussianDiffusion(linear, variance="learned_range", loss="hybrid")
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 999])
    for v, expected in [(1.0, torch.log(linear.betas[t])), (-1.0, d.posterior_log_variance_clipped[t]),
                        (0.0, 0.5 * (torch.log(linear.betas[t]) + d.posterior_log_variance_clipped[t]))]:
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        pm = d.p_mean_variance(None, x, t, model_output=out)
        torch.testing.assert_close(pm["log_variance"][:, 0, 0, 0], expected)


def test_fixed_variances(linear):
    x = torch.zeros(2, 1, dtype=torch.float64)
    t = torch.tensor([0, 500])
    small = GaussianDiffusion(linear, variance="fixed_small").p_mean_variance(None, x, t, model_output=x)
    large = GaussianDiffusion(linear, variance="fixed_large").p_mean_variance(None, x, t, model_output=x)
    b = linear.betas
    ac = linear.alphas_cumprod
    beta_tilde_500 = b[500] * (1 - ac[499]) / (1 - ac[500])
    assert small["variance"][1, 0].item() == pytest.approx(beta_tilde_500.item())
    assert large["variance"][1, 0].item() == pytest.approx(b[500].item())
    beta_tilde_1 = b[1] * (1 - ac[0]) / (1 - ac[1])
    assert small["variance"][0, 0].item() == pytest.approx(beta_tilde_1.item())  # clipped at t = 0


def test_hybrid_vlb_term_trains_only_the_variance(linear):
    d = GaussianDiffusion(linear, variance="learned_range", loss="hybrid")
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 3, 300, 900])
    noise = torch.randn(x0.shape, generator=g)
    out = torch.randn(4, 4, 3, 3, generator=g, requires_grad=True)
    losses = d.training_losses(lambda x, tt: out, x0, t=t, noise=noise)
    losses["loss"].sum().backward(retain_graph=True)
    mean_grad = out.grad[:, :2].clone()
    out.grad = None
    losses["mse"].sum().backward()
    torch.testing.assert_close(mean_grad, out.grad[:, :2])  # the mean sees only L_simple
    assert (out.grad[:, 2:] == 0).all()
    assert losses["loss"].detach().sub(losses["mse"].detach()).abs().sum() > 0  # the VLB term is there


def test_vlb_loss_trains_the_mean_too(linear):
    d = GaussianDiffusion(linear, variance="learned_range", loss="vlb")
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    out = torch.zeros(2, 2, 4, 4, requires_grad=True)
    losses = d.training_losses(lambda x, tt: out, x0, t=torch.tensor([5, 50]))
    losses["loss"].sum().backward()
    assert out.grad[:, :1].abs().sum() > 0 and out.grad[:, 1:].abs().sum() > 0


def test_importance_sampler_eq_103():
    s = ImportanceTimestepSampler(4, history=3, uniform_prob=0.0)
    assert torch.allclose(torch.as_tensor(s.weights()), torch.full((4,), 0.25, dtype=torch.float64))
    for _ in range(3):
        s.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 4.0]))
    assert not s.warmed_up()  # uniform until every t has its history (errata)
    s.update(torch.tensor([3, 3, 3]), torch.tensor([1.0, 1.0, 3.0]))
    assert s.warmed_up()
    rms = torch.tensor([1.0, 2.0, 4.0, math.sqrt((1 + 1 + 9) / 3)], dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(s.weights()), rms / rms.sum())
    # weights 1 / (T p_t) keep the loss unbiased: E_p[w L] = mean_t L_t
    t, w = s.sample(200_000, "cpu", torch.Generator().manual_seed(0))
    L = torch.tensor([5.0, 1.0, 2.0, 7.0])
    assert (w * L[t]).mean().item() == pytest.approx(L.mean().item(), rel=0.02)
    s.update(torch.tensor([0]), torch.tensor([10.0]))  # the history is a sliding window
    assert s._losses[0].tolist() == [1.0, 1.0, 10.0]


def test_nll_bpd_bounds_the_exact_nll_of_a_finite_set():
    schedule = NoiseSchedule.linear(200)
    data = FiniteImageSet.random(K=8, shape=(3, 4, 4), seed=0)
    d = GaussianDiffusion(schedule)
    x0 = data.images.float()
    out = d.nll_bpd(data.model(schedule), x0, generator=torch.Generator().manual_seed(0))
    total = out["total_bpd"]
    exact = data.exact_nll_bpd()  # log2(8) / 48
    assert torch.isfinite(out["vb"]).all() and (out["vb"][:, 1:] >= -1e-6).all()  # KLs are >= 0
    assert out["prior_bpd"].max() < 1e-4  # q(x_T | x_0) is nearly N(0, I)
    assert total.mean().item() >= exact
    # The KL terms carry the information: they bound I(x_0; x_1) ~ log2(K) / D from above
    # (data processing), and with the exact denoiser they are close to it.
    kl_part = out["vb"][:, 1:].sum(1).mean().item() + out["prior_bpd"].mean().item()
    assert 0.7 * exact < kl_part < 1.5 * exact
    # The decoder L_0 in closed form: x_1 identifies the image, so the mean is x_0 itself
    # and each pixel costs -log2 of the N(x_0, beta-tilde_1) mass of its bin (Eqs. 95-97).
    b = schedule.betas
    ac0, ac1 = 1 - b[0].item(), (1 - b[0].item()) * (1 - b[1].item())
    sigma = math.sqrt(b[1].item() * (1 - ac0) / (1 - ac1))
    half = 1 / 255
    interior = -math.log2(2 * stats.norm.cdf(half / sigma) - 1)
    edge = -math.log2(stats.norm.cdf(half / sigma))
    is_edge = (x0.abs() == 1).double().flatten(1).mean(1)
    expected_decoder = is_edge * edge + (1 - is_edge) * interior
    torch.testing.assert_close(out["vb"][:, 0], expected_decoder, rtol=1e-6, atol=1e-6)
    assert out["vb"].shape == (8, 200) and out["xstart_mse"].shape == (8, 200)


def test_bad_names_and_inputs(linear):
    with pytest.raises(ValueError, match="prediction must be one of"):
        GaussianDiffusion(linear, prediction="score")
    with pytest.raises(ValueError, match="variance must be one of"):
        GaussianDiffusion(linear, variance="big")
    with pytest.raises(ValueError, match="loss must be one of"):
        GaussianDiffusion(linear, loss="l1")
    with pytest.raises(ValueError, match="t_sampler must be one of"):
        GaussianDiffusion(linear, t_sampler="cosine")
    with pytest.raises(ValueError, match="cannot train variance"):
        GaussianDiffusion(linear, variance="learned")
    with pytest.raises(TypeError, match="schedule must be"):
        GaussianDiffusion([0.1, 0.2])
    d = GaussianDiffusion(linear)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        d.q_sample(x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        d.q_sample(x, torch.tensor([0]))
    with pytest.raises(ValueError, match="model output shape"):
        d.training_losses(lambda x_t, t: torch.zeros(2, 6), x, t=torch.tensor([1, 2]))
