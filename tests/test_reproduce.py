"""`fastdiff reproduce`: the quick run end to end, its statistics helpers against closed forms
and independent estimates (never against the scipy calls they wrap), and its argument errors."""
import json
import math
import re
import statistics
import sys
import time
from statistics import NormalDist

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.cli import main
from fastdiff.metrics import fid_from_features
from fastdiff.experiments.reproduce import (EXPERIMENTS, QUICK, Run, bootstrap_fid, mmd2_to_mixture,
                                           normal_bootstrap_interval, t_interval)
from fastdiff.testing import GaussianMixture

pytest.importorskip("matplotlib")


# --------------------------------------------------------------------------- the quick run
def test_quick_run_writes_the_report_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    t0 = time.time()
    assert main(["reproduce", "--quick", "--out", "rq", "--threads", "1", "--no-progress"]) == 0
    first = time.time() - t0
    assert "report written to" in capsys.readouterr().out
    out = tmp_path / "rq"
    report = (out / "REPORT.md").read_text()

    # every figure the report names exists and is a readable PNG
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(figures) >= 5
    for name in figures:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100

    # one section per experiment, each with a markdown table and a verdict
    sections = re.split(r"^## (?=\d\. )", report, flags=re.M)[1:]
    assert [int(s[0]) for s in sections] == list(EXPERIMENTS)
    for s in sections:
        assert re.search(r"^\|---", s, flags=re.M), s[:80]
        assert "**Verdict.**" in s and "**Paper's claim.**" in s
    assert "--quick" in report and "thread" in report
    _check_solver_numbers(json.loads((out / "results.json").read_text()))

    # a rerun of one experiment reads the cache: no model is trained again
    ckpts = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("checkpoint.json")}
    assert len(ckpts) == 4
    t0 = time.time()
    assert main(["reproduce", "--quick", "--out", "rq", "--threads", "1", "--no-progress", "--only", "1"]) == 0
    assert time.time() - t0 < max(20.0, first / 3)
    assert {p: p.stat().st_mtime_ns for p in ckpts} == ckpts
    report = (out / "REPORT.md").read_text()
    assert "## 1. " in report and "## 2. " not in report and "earlier invocation" in report


def _check_solver_numbers(results):
    """What experiments 5-7 claim to have measured is there and consistent."""
    # 5: the report's PF-ODE slopes are the solvers' orders (the same settings in quick and full runs)
    from fastdiff.experiments.reproduce.exp5_oracle import ODE_SOLVERS
    slopes = results["5"]["pf_ode"]["slopes"]
    assert set(slopes) == set(ODE_SOLVERS)
    for name, (_, order, _) in ODE_SOLVERS.items():   # DPM-Solver-3 beats its order on Gaussian data
        assert order - 0.3 <= slopes[name] <= order + (1.5 if name == "dpm_solver_3" else 0.3), (name, slopes[name])
    errors = results["5"]["pf_ode"]["errors"]["ode"]
    assert errors[-1][1] < errors[0][1] and all(nfe > 0 for nfe, _, _ in errors)   # tighter rtol, smaller error
    # 6: every cell records the NFE sample() counted; the adaptive ODE's is its own
    cells = results["6"]["cells"]
    assert cells["ddim|NFE=10"]["nfe"] == 10 and cells["heun|NFE=10"]["nfe"] == 9
    assert all(isinstance(c["nfe"], int) and c["nfe"] > 2 for c in results["6"]["ode"].values())
    assert isinstance(results["6"]["goal_met"], bool) and len(results["6"]["dpmpp2m10_minus_ddim50"]) == 3
    # 7: ODE and VLB bits/dim on the same images, the paired difference between them
    for rec in results["7"].values():
        ode, vlb, (d, lo, hi) = rec["ode"], rec["vlb"], rec["ode_minus_vlb"]
        assert ode["n"] == vlb["n"] and lo <= d <= hi and math.isclose(d, ode["bpd"] - vlb["bpd"], abs_tol=1e-9)


def test_settings_added_later_are_accepted_in_an_existing_folder(tmp_path):
    """A field added to Settings after a folder was started (a new experiment's) cannot have
    changed the cached results: the folder is resumed and the field recorded; a changed value
    of an existing field is still refused."""
    Run(tmp_path, QUICK, seed=0, progress=False)
    path = tmp_path / "cache" / "settings.json"
    stored = json.loads(path.read_text())
    del stored["settings"]["oracle_bandwidth"]
    path.write_text(json.dumps(stored))
    Run(tmp_path, QUICK, seed=0, progress=False)
    assert json.loads(path.read_text())["settings"]["oracle_bandwidth"] == QUICK.oracle_bandwidth
    stored["settings"]["n_gen"] = 7
    path.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="--out .*other settings"):
        Run(tmp_path, QUICK, seed=0, progress=False)


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    Run(tmp_path, QUICK, seed=0, progress=False)
    Run(tmp_path, QUICK, seed=0, progress=False)  # the same settings resume
    with pytest.raises(ValueError, match="--out .*other settings"):
        Run(tmp_path, QUICK, seed=1, progress=False)


# --------------------------------------------------------------------------- arguments
def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fastdiff reproduce" in out and "--quick" in out and "--only" in out


@pytest.mark.parametrize("argv, needle", [
    (["--only", "99"], "--only"),
    (["--only", "1,x"], "'1,x'"),
    (["--only", "0"], f"from 1 to {len(EXPERIMENTS)}"),
    (["--threads", "0"], "positive integer"),
    (["--seed", "one"], "--seed"),
])
def test_bad_arguments_exit_2_naming_them(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--quick"] + argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_without_matplotlib_it_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "fastdiff[report]"' in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # it failed before doing any work
    from fastdiff.experiments.reproduce import reproduce
    with pytest.raises(ImportError, match=r"fastdiff\[report\]"):
        reproduce(tmp_path / "o2", quick=True, progress=False)


# --------------------------------------------------------------------------- statistics
def _t_quantile_closed_form(p: float, df: int) -> float:
    """The Student-t quantile in closed form, where one exists in elementary functions:
    df = 1 is the Cauchy law, tan(π(p − 1/2)); df = 2, (2p − 1)/√(2p(1 − p)); df = 4,
    sign(p − 1/2)·2√(q − 1) with α = 4p(1 − p), q = cos(arccos(√α)/3)/√α (Shaw 2006)."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    if df == 4:
        a = 4 * p * (1 - p)
        q = math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a)
        return math.copysign(2 * math.sqrt(q - 1), p - 0.5)
    raise ValueError(df)


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99])
def test_t_interval_is_mean_plus_minus_the_closed_form_t_quantile(n, confidence):
    x = np.random.default_rng(n).normal(3.0, 2.0, n)
    mean, lo, hi = t_interval(x, confidence)
    # the truth by hand: sample mean, sample sd with n - 1, the t quantile in closed form
    m = sum(x) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1))
    half = _t_quantile_closed_form(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    assert mean == pytest.approx(m, rel=1e-12)
    assert (lo, hi) == pytest.approx((m - half, m + half), rel=1e-9)


def test_closed_form_t_quantiles_are_right():
    """The test's own truth, on textbook table values (two-sided 95%: 12.706, 4.303, 2.776)."""
    assert [round(_t_quantile_closed_form(0.975, df), 3) for df in (1, 2, 4)] == [12.706, 4.303, 2.776]
    assert _t_quantile_closed_form(0.025, 4) == pytest.approx(-2.776, abs=1e-3)


def test_t_interval_covers_the_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials = 4000
    covered = sum(lo <= 1.0 <= hi for _, lo, hi in (t_interval(rng.normal(1.0, 3.0, 4)) for _ in range(trials)))
    # binomial(4000, 0.95) has sd 0.0034: 4 sd either side
    assert abs(covered / trials - 0.95) < 0.014


def test_t_interval_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([1.0])
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], confidence=1.5)


def test_normal_bootstrap_interval_of_a_mean_matches_the_normal_theory_interval():
    rng = np.random.default_rng(1)
    x = rng.exponential(2.0, 2000)
    reps = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(2000)]
    lo, hi = normal_bootstrap_interval(x.mean(), reps)
    half = NormalDist().inv_cdf(0.975) * x.std(ddof=1) / np.sqrt(len(x))
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.08)
    assert (lo + hi) / 2 == pytest.approx(x.mean())


def test_normal_bootstrap_interval_is_point_plus_minus_z_standard_errors():
    reps = np.random.default_rng(3).gamma(2.0, 1.5, 50)
    for confidence in (0.8, 0.95):
        lo, hi = normal_bootstrap_interval(5.0, reps, confidence)
        half = NormalDist().inv_cdf(0.5 + confidence / 2) * statistics.stdev(reps.tolist())
        assert (lo, hi) == pytest.approx((5.0 - half, 5.0 + half), rel=1e-12)


def test_bootstrap_fid_point_is_the_fid_and_paired_differences_cancel():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(400, 6))
    gen = rng.normal(0.3, 1.2, size=(200, 6))
    value, lo, hi = bootstrap_fid(gen, ref, reps=60, seed=0)
    assert value == pytest.approx(fid_from_features(gen, ref), rel=1e-10)
    assert lo < value < hi and hi - lo > 0
    d, dlo, dhi = bootstrap_fid(gen, ref, reps=20, seed=0, other=gen.copy())
    assert d == pytest.approx(0.0, abs=1e-9) and dlo == pytest.approx(0.0, abs=1e-9) and dhi == pytest.approx(0.0, abs=1e-9)
    # a clearly worse set is clearly worse, pairwise
    worse = gen + 0.5
    d, dlo, dhi = bootstrap_fid(worse, ref, reps=60, seed=0, other=gen)
    assert dlo > 0


def _mc_mmd2(x: torch.Tensor, y: torch.Tensor, h: float) -> float:
    """Unbiased MMD² between two samples, by U-statistics on all three terms."""
    def k(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * h * h))
    n, m = len(x), len(y)
    kxx = (k(x, x).sum() - n) / (n * (n - 1))
    kyy = sum((k(y[s:s + 2000], y).sum() for s in range(0, m, 2000))) - m
    kyy = kyy / (m * (m - 1))
    return float(kxx + kyy - 2 * k(x, y).mean())


def test_mmd2_to_mixture_matches_a_monte_carlo_estimate():
    mix = GaussianMixture.three_component_2d()
    g = torch.Generator().manual_seed(0)
    x = mix.sample(1500, generator=g) + torch.tensor([0.25, -0.1], dtype=torch.float64)
    exact = mmd2_to_mixture(x, mix, 0.2)
    y = mix.sample(12000, generator=g)
    mc = _mc_mmd2(x, y, 0.2)
    assert exact > 0.01
    assert exact == pytest.approx(mc, rel=0.05)


def test_mmd2_to_mixture_of_exact_samples_is_zero_on_average():
    mix = GaussianMixture.three_component_2d()
    vals = [mmd2_to_mixture(mix.sample(1000, generator=torch.Generator().manual_seed(s)), mix, 0.2)
            for s in range(8)]
    mean, lo, hi = t_interval(vals)
    assert lo < 0 < hi  # unbiased: the interval of exact samples holds 0
    shifted = mix.sample(1000, generator=torch.Generator().manual_seed(99)) + 0.1
    assert mmd2_to_mixture(shifted, mix, 0.2) > hi + 10 * (hi - lo)
