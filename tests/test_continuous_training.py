"""Continuous-time training (#13, `fastdiff train --sde vp|ve --weighting ...`): the loss is the
eps-MSE of the VP process through the schedule's knots, minimised by the exact denoiser; the
likelihood weighting draws t in proportion to g^2 / sigma^2; runs resume exactly."""
import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.sde import ContinuousTimeLoss, DiscreteVPSDE
from fastdiff.testing import GaussianMixture
from fastdiff.train import TrainConfig, train
from test_train import FAST, _assert_bitwise_equal, _weights


def test_oracle_minimises_the_continuous_loss():
    schedule = fastdiff.NoiseSchedule.linear(1000)
    mix = GaussianMixture.three_component_2d()
    loss = ContinuousTimeLoss(schedule)
    sde = loss.sde
    x0 = mix.sample(4096, generator=torch.Generator().manual_seed(0))

    def oracle(x, t_model):  # the exact eps at fractional timesteps (continuous t)
        t = (t_model.double() + 1.0) / sde.T
        ac = (sde.alpha(t) ** 2).reshape(-1, 1)
        return ((x - ac.sqrt() * mix.posterior_mean(x, ac)) / (1 - ac).sqrt()).to(x.dtype)

    g = torch.Generator().manual_seed(1)
    best = loss(oracle, x0, generator=g)["loss"].mean()
    g = torch.Generator().manual_seed(1)
    worse = loss(lambda x, t: oracle(x, t) * 1.05, x0, generator=g)["loss"].mean()
    assert best < worse


def test_likelihood_weighting_draws_t_in_proportion_to_g2_over_sigma2():
    schedule = fastdiff.NoiseSchedule.linear(1000)
    loss = ContinuousTimeLoss(schedule, weighting="likelihood")
    t = loss.sample_t(20000, torch.Generator().manual_seed(0))
    sde = DiscreteVPSDE(schedule)
    # closed form on a VP process: beta dt = -d abar / abar, so int g^2 / sigma^2 dt =
    # int -d abar / (abar (1 - abar)) = log((1 - abar) / abar) = -2 lambda: the CDF is linear in lambda
    lam = lambda u: float(sde.log_snr(u))  # noqa: E731
    for q in (0.1, 0.5, 0.9):
        tq = float(np.quantile(t.numpy(), q))
        cdf = (lam(sde.t_min) - lam(tq)) / (lam(sde.t_min) - lam(1.0))
        assert abs(cdf - q) < 0.02, (q, tq, cdf)


@pytest.mark.parametrize("sde, weighting", [("vp", "likelihood"), ("ve", "simple")])
def test_sde_training_runs_samples_and_resumes_exactly(tmp_path, sde, weighting):
    cfg = dict(FAST, sde=sde, weighting=weighting, save_every=2, sample_at_end=False)
    full = train(TrainConfig(out=str(tmp_path / "full"), steps=4, **cfg))
    train(TrainConfig(out=str(tmp_path / "half"), steps=2, **cfg))
    train(TrainConfig(out=str(tmp_path / "half"), steps=4, resume=True, **cfg))
    _assert_bitwise_equal(_weights(tmp_path / "full"), _weights(tmp_path / "half"))
    assert all(np.isfinite(v) for _, v in full.losses)
    model, _ = fastdiff.load_model(tmp_path / "full")
    x = fastdiff.sample(model, n=2, steps=3, sampler="dpmpp_2m")
    assert torch.isfinite(x).all()


def test_sde_config_errors():
    with pytest.raises(ValueError, match="trains the mean only"):
        TrainConfig(**dict(FAST, sde="vp", loss="hybrid")).validate()
    with pytest.raises(ValueError, match="needs continuous-time training"):
        TrainConfig(**dict(FAST, weighting="likelihood")).validate()
