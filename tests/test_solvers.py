"""Continuous-time samplers (#13): order of convergence against the closed-form PF-ODE solution
for Gaussian data, laws on the mixture oracle (VP and VE), a peer (diffusers' schedulers),
spacings, the noise contract and bad input."""
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.sampling.solvers import SOLVERS, Denoiser, Grid, SamplerOptions
from fastdiff.sampling.spacing import log_snr_targets
from fastdiff.sde import VESDE, VPSDE
from fastdiff.testing import GaussianMixture
from test_sampling import _check_mixture

# --------------------------------------------------------------------------- order of convergence
MU = torch.tensor([[0.3, -0.5, 0.1]], dtype=torch.float64)
VAR = torch.tensor([[0.5, 0.2, 1.0]], dtype=torch.float64) ** 2
T0, T1 = 1.0, 1e-3


def _pf_ode_exact(sde, x, t0, t1):
    """Closed-form PF-ODE flow for x_0 ~ N(mu, diag(var)): in x~ = x / alpha, sigma~ = sigma / alpha,
    dx~/dsigma~ = (x~ - D) / sigma~ with D = mu + var / (var + sigma~^2) (x~ - mu), so
    x~ - mu is proportional to sqrt(var + sigma~^2)."""
    a0, s0, a1, s1 = (float(f(t)) for t in (t0, t1) for f in (sde.alpha, sde.sigma))
    sig0, sig1 = s0 / a0, s1 / a1
    return a1 * (MU + (x / a0 - MU) * torch.sqrt(VAR + sig1 ** 2) / torch.sqrt(VAR + sig0 ** 2))


def _karras_grid(sde, steps):
    lam = log_snr_targets(float(sde.log_snr(T1)), float(sde.log_snr(T0)), steps + 1, "karras")
    ts = sde.t_of_log_snr(lam)
    ts[0], ts[-1] = T0, T1
    tt = torch.tensor(ts, dtype=torch.float64)
    return Grid(ts.tolist(), sde.alpha(tt).numpy(), sde.sigma(tt).numpy())  # ends at T1: no final denoising


EVALS = {"euler": 1, "heun": 2, "dpm_solver_2": 2, "dpm_solver_3": 3, "dpmpp_2m": 1, "dpmpp_3m": 1, "unipc": 1}


def _errors(name, nfes=(32, 64, 128, 256)):
    sde = VPSDE()
    model = GaussianMixture(MU, VAR).model(sde, "eps")
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = _pf_ode_exact(sde, x, T0, T1)
    errs, used = [], []
    for nfe in nfes:
        den = Denoiser(model, sde, "eps")
        out = SOLVERS[name].fn(den, x.clone(), _karras_grid(sde, nfe // EVALS[name]), SamplerOptions())
        errs.append((out - ref).abs().max().item())
        used.append(den.nfe)
    return np.array(used), np.array(errs)


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpm_solver_2", 2), ("dpmpp_2m", 2),
                                         ("dpmpp_3m", 3), ("unipc", 3)])   # UniPC-2: UniC adds one order
def test_order_of_convergence(name, order):
    nfe, err = _errors(name)
    slope = -np.polyfit(np.log(nfe), np.log(err), 1)[0]
    assert abs(slope - order) <= 0.3, (name, slope, err)


def test_dpm_solver_3_is_at_least_third_order():
    nfe, err = _errors("dpm_solver_3", (30, 60, 120))
    slope = -np.polyfit(np.log(nfe), np.log(err), 1)[0]
    assert slope >= 2.7, (slope, err)


def test_adaptive_ode_reaches_its_tolerance():
    sde = VPSDE()
    model = GaussianMixture(MU, VAR).model(sde, "eps")
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, s = sde.alpha(T1).item(), sde.sigma(T1).item()
    grid = Grid([T0, T1, T1], np.array([sde.alpha(T0).item(), a, a]), np.array([sde.sigma(T0).item(), s, s]))
    den = Denoiser(model, sde, "eps")
    out = SOLVERS["ode"].fn(den, x.clone(), grid, SamplerOptions(rtol=1e-5, atol=1e-7))
    assert (out - _pf_ode_exact(sde, x, T0, T1)).abs().max().item() <= 1e-4


def test_fixed_step_solvers_sample_the_gaussian_through_sample():
    """End to end through fastdiff.sample on the continuous VP SDE, into sigma = 0."""
    sde = VPSDE()
    model = GaussianMixture(MU, VAR).model(sde, "x0")
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = _pf_ode_exact(sde, x_T, 1.0, 0.0)
    for name in ("heun", "dpmpp_2m", "dpmpp_3m", "dpm_solver_3"):
        x = fastdiff.sample(model, steps=100, sampler=name, diffusion=sde, x_T=x_T, clip_denoised=False)
        # the last step (t_min -> sigma = 0) is first order: error ~ sigma~(t_min)^2 relative
        assert (x - ref).abs().max().item() < 2e-3, name


# --------------------------------------------------------------------------- laws
@pytest.fixture(scope="module")
def linear():
    return fastdiff.NoiseSchedule.linear(1000)


@pytest.mark.parametrize("sampler, steps", [("sde", 250), ("pc", 250)])
def test_reverse_sde_and_pc_reproduce_the_mixture(linear, sampler, steps):
    mix = GaussianMixture.three_component_2d()
    x = fastdiff.sample(mix.model(linear), (2048, 2), steps=steps, sampler=sampler, clip_denoised=False, seed=5,
                        dtype=torch.float64)
    _check_mixture(mix, x)


@pytest.mark.parametrize("sampler, steps", [("sde", 250), ("dpmpp_2m", 30)])
def test_ve_sde_reproduces_the_mixture(sampler, steps):
    mix = GaussianMixture.three_component_2d()
    sde = VESDE(sigma_min=0.01, sigma_max=20.0)
    x = fastdiff.sample(mix.model(sde), (2048, 2), steps=steps, sampler=sampler, diffusion=sde,
                        clip_denoised=False, seed=6, dtype=torch.float64)
    _check_mixture(mix, x)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_every_prediction_type_gives_the_same_ode_solution(linear, prediction):
    mix = GaussianMixture.three_component_2d()
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = fastdiff.sample(mix.model(linear, "eps"), steps=20, sampler="dpmpp_2m", x_T=x_T, clip_denoised=False)
    got = fastdiff.sample(mix.model(linear, prediction), steps=20, sampler="dpmpp_2m", x_T=x_T, clip_denoised=False,
                          diffusion=fastdiff.GaussianDiffusion(linear, prediction=prediction))
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_learned_variance_channels_are_ignored_by_the_ode_solvers(linear):
    mix = GaussianMixture.three_component_2d()
    model = mix.model(linear)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def learned(x, t):
        return torch.cat([model(x, t), torch.full_like(x, 0.3)], dim=1)

    d = fastdiff.GaussianDiffusion(linear, variance="learned_range", loss="hybrid")
    for name in ("euler", "dpmpp_3m", "pc"):
        a = fastdiff.sample(learned, steps=10, sampler=name, diffusion=d, x_T=x_T, clip_denoised=False)
        b = fastdiff.sample(model, steps=10, sampler=name, x_T=x_T, clip_denoised=False)
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- a peer: diffusers
def _diffusers_loop(scheduler, model, x_T, steps):
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
        eps = model(scheduler.scale_model_input(x, t), tt)
        x = scheduler.step(eps, t, x).prev_sample
    return x, [int(t) for t in scheduler.timesteps]


@pytest.mark.parametrize("name, steps", [("dpmpp_2m", 10), ("dpmpp_2m", 25), ("euler", 12), ("heun", 12),
                                         ("unipc", 10), ("unipc", 25)])
def test_equals_diffusers_schedulers(linear, name, steps):
    diffusers = pytest.importorskip("diffusers")
    mix = GaussianMixture.three_component_2d()
    model = mix.model(linear)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon")
    if name == "dpmpp_2m":
        sched = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                      final_sigmas_type="zero", **common)
    elif name == "euler":  # "leading": integer timesteps (see docs/score-based.md, Conventions)
        sched = diffusers.EulerDiscreteScheduler(timestep_spacing="leading", **common)
    elif name == "unipc":  # UniPC-2, B(h) = e^h - 1, data prediction, corrector after every step
        sched = diffusers.UniPCMultistepScheduler(solver_order=2, solver_type="bh2", predict_x0=True,
                                                  lower_order_final=True, final_sigmas_type="zero", **common)
    else:
        sched = diffusers.HeunDiscreteScheduler(timestep_spacing="leading", **common)
    sched.alphas_cumprod = linear.alphas_cumprod.clone()  # float64, as ours (diffusers: float32)
    ref, ts = _diffusers_loop(sched, model, x_T, steps)
    got = fastdiff.sample(model, sampler=name, timesteps=sorted(set(ts)), x_T=x_T, clip_denoised=False)
    assert (got - ref).abs().max().item() < 1e-4


# --------------------------------------------------------------------------- spacing and defaults
@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
def test_log_snr_spacings_give_distinct_table_timesteps(linear, spacing):
    d = fastdiff.GaussianDiffusion(linear)
    for steps in (1, 2, 10, 200, 1000):
        st = {}
        fastdiff.sample(lambda x, t: torch.zeros_like(x), (1, 2), steps=steps, sampler="euler", diffusion=d,
                        spacing=spacing, stats=st)
        ts = st["timesteps"]
        assert len(ts) == steps == len(set(ts)) and ts[-1] == 999 and (steps == 1 or ts[0] == 0)
    # logsnr: the knots' log-SNR are close to equally spaced away from the table's dense end
    st = {}
    fastdiff.sample(lambda x, t: torch.zeros_like(x), (1, 2), steps=20, sampler="dpmpp_2m", spacing="logsnr",
                    stats=st)
    ac = linear.alphas_cumprod[st["timesteps"]]
    lam = 0.5 * torch.log(ac / (1 - ac))
    gaps = torch.diff(lam)[1:]
    assert (gaps.max() - gaps.min()) / gaps.mean() < 0.2


def test_default_spacing_per_sampler_and_explicit_timesteps(linear):
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    seen = {}
    for name in ("ddim", "euler", "dpmpp_2m"):
        st = {}
        fastdiff.sample(zero, (1, 2), steps=8, sampler=name, stats=st)
        seen[name] = st["timesteps"]
    d = fastdiff.GaussianDiffusion(linear)
    assert seen["ddim"] == fastdiff.space_timesteps(1000, 8, "uniform")
    assert seen["euler"] == fastdiff.sampling.spacing.table_indices(d.alphas_cumprod, 8, "karras")
    assert seen["dpmpp_2m"] == fastdiff.sampling.spacing.table_indices(d.alphas_cumprod, 8, "logsnr")
    st = {}
    fastdiff.sample(zero, (1, 2), sampler="heun", timesteps=[999, 500, 10], stats=st)
    assert st["timesteps"] == [10, 500, 999] and st["nfe"] == 5   # Heun: 2 N - 1
    zero.default_spacing = lambda steps: [999, 0]
    fastdiff.sample(zero, (1, 2), steps=8, sampler="dpmpp_2m", stats=st)
    assert st["timesteps"] == [0, 999]


def test_noise_contract_for_stochastic_solvers(linear):
    mix = GaussianMixture.three_component_2d()
    model = mix.model(linear)
    for name, extra in (("sde", {}), ("pc", {}), ("heun", {"s_churn": 5.0})):
        batch = fastdiff.sample(model, (4, 2), steps=10, sampler=name, seed=9, **extra)
        alone = fastdiff.sample(model, (1, 2), steps=10, sampler=name, seed=9, sample_offset=2, **extra)
        torch.testing.assert_close(batch[2:3], alone)
        other = fastdiff.sample(model, (4, 2), steps=10, sampler=name, seed=10, **extra)
        assert not torch.allclose(batch, other)


def test_classifier_free_guidance_and_classifier_reach_the_solvers(linear):
    mix = GaussianMixture.two_class_2d()
    model = mix.model(linear)
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    cond = fastdiff.sample(model, steps=20, sampler="dpmpp_2m", x_T=x_T, y=1, guidance_scale=0.0,
                           clip_denoised=False)
    # the conditional law's own ODE: a model that always sees y = 1
    fixed = lambda x, t: model(x, t, y=torch.ones(x.shape[0], dtype=torch.long))  # noqa: E731
    torch.testing.assert_close(cond, fastdiff.sample(fixed, steps=20, sampler="dpmpp_2m", x_T=x_T,
                                                     clip_denoised=False))
    guided = fastdiff.sample(model, steps=20, sampler="dpmpp_2m", x_T=x_T, y=1, guidance_scale=3.0,
                             clip_denoised=False)
    assert (mix.class_log_posterior(guided, torch.ones(256, 1, dtype=torch.float64))[:, 1].mean()
            > mix.class_log_posterior(cond, torch.ones(256, 1, dtype=torch.float64))[:, 1].mean())
    unconditional = lambda x, t: model(x, t)  # noqa: E731
    cls = fastdiff.sample(unconditional, steps=20, sampler="euler", x_T=x_T, y=1,
                          classifier=mix.classifier(linear), classifier_scale=1.0, clip_denoised=False)
    assert (mix.class_log_posterior(cls, torch.ones(256, 1, dtype=torch.float64))[:, 1].exp() > 0.5).float().mean() > 0.8


def test_diffusers_style_output_is_unwrapped(linear):
    mix = GaussianMixture.three_component_2d()
    model = mix.model(linear)

    class Output:
        def __init__(self, sample):
            self.sample = sample

    wrapped = lambda x, t: Output(model(x, t))  # noqa: E731
    x_T = torch.randn(4, 2, dtype=torch.float64)
    for name in ("ddim", "dpmpp_2m"):
        torch.testing.assert_close(fastdiff.sample(wrapped, steps=5, sampler=name, x_T=x_T),
                                   fastdiff.sample(model, steps=5, sampler=name, x_T=x_T))
    with pytest.raises(TypeError, match="must return a tensor"):
        fastdiff.sample(lambda x, t: (x,), (2, 2), steps=3)


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_a_clear_error(linear):
    mix = GaussianMixture.three_component_2d()
    model = mix.model(linear)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match=r"sampler must be one of .*'dpmpp_2m'.*got 'dpm\+\+2m'"):
        fastdiff.sample(zero, (2, 2), sampler="dpm++2m")
    with pytest.raises(ValueError, match=r"dpmpp_3m' needs steps >= 3 .*got 2"):
        fastdiff.sample(zero, (2, 2), steps=2, sampler="dpmpp_3m")
    with pytest.raises(ValueError, match="dpmpp_2m' needs steps >= 2"):
        fastdiff.sample(zero, (2, 2), sampler="dpmpp_2m", timesteps=[999])
    with pytest.raises(ValueError, match="unipc' needs steps >= 2"):
        fastdiff.sample(zero, (2, 2), sampler="unipc", steps=1)
    for name, value in (("rtol", math.nan), ("atol", -1.0), ("rtol", "a")):
        with pytest.raises(ValueError, match=f"{name} must be a finite number > 0"):
            fastdiff.sample(zero, (2, 2), sampler="ode", **{name: value})
    with pytest.raises(ValueError, match="rtol=0.001 is used only by sampler='ode'"):
        fastdiff.sample(zero, (2, 2), sampler="dpmpp_2m", rtol=1e-3)
    with pytest.raises(ValueError, match="s_churn"):
        fastdiff.sample(zero, (2, 2), sampler="dpmpp_2m", s_churn=1.0)
    with pytest.raises(ValueError, match="eta=0.5 is used only by"):
        fastdiff.sample(zero, (2, 2), sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match="spacing must be one of"):
        fastdiff.sample(zero, (2, 2), sampler="euler", spacing="log")
    with pytest.raises(ValueError, match="either spacing= or timesteps="):
        fastdiff.sample(zero, (2, 2), sampler="euler", spacing="karras", timesteps=[999, 0])
    with pytest.raises(ValueError, match="distinct original timesteps"):
        fastdiff.sample(zero, (2, 2), sampler="euler", timesteps=[999, 1000])
    with pytest.raises(ValueError, match="needs a discrete-time GaussianDiffusion"):
        fastdiff.sample(zero, (2, 2), sampler="ddim", diffusion=VPSDE())
    with pytest.raises(ValueError, match="cuda_graph/compile serve sampler='ddim'/'ddpm' only"):
        fastdiff.sample(zero, (2, 2), sampler="euler", compile="default")


def test_sample_argument_errors_from_issue_12(linear):
    mix = GaussianMixture.two_class_2d()
    conditional = mix.model(linear)
    unconditional = GaussianMixture.three_component_2d().model(linear)
    with pytest.raises(ValueError, match="not class-conditional .* the labels would be ignored"):
        fastdiff.sample(unconditional, (2, 2), steps=3, y=1)
    with pytest.raises(TypeError, match=r"shape must be a sequence \(batch, ...\) of ints, got int \(5\)"):
        fastdiff.sample(unconditional, 5, steps=3)
    with pytest.raises(TypeError, match="x_T has dtype torch.float16 but the model's parameters are torch.float32"):
        fastdiff.sample(_Wrapped(torch.nn.Linear(2, 2)), steps=3, x_T=torch.zeros(2, 2, dtype=torch.float16))
    for bad in (3, -1):
        with pytest.raises(ValueError, match=rf"null_label must be in \[0, 2\] .*got {bad}"):
            fastdiff.sample(conditional, (2, 2), steps=3, y=0, guidance_scale=1.0, null_label=bad)


class _Wrapped(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x)


def test_cli_names_match_the_library():
    from fastdiff.cli.sample import SAMPLER_NAMES, SPACING_NAMES
    assert SAMPLER_NAMES == fastdiff.sampling.SAMPLERS
    assert SPACING_NAMES == fastdiff.sampling.SPACINGS
