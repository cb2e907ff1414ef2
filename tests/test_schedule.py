"""Noise schedules against their closed forms."""
import math

import numpy as np
import pytest
import torch

from fastdiff import NoiseSchedule
from fastdiff.schedule import extract


def test_linear_matches_ho_et_al():
    s = NoiseSchedule.linear(1000)
    assert s.T == 1000 and s.betas.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert np.allclose(np.diff(s.betas.numpy()), (0.02 - 1e-4) / 999)
    # abar_t = prod_{s<=t} (1 - beta_s), starting from the first step (errata)
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    assert s.alphas_cumprod[-1].item() == pytest.approx(math.prod(1 - b for b in s.betas.tolist()))


def test_linear_rescales_end_points_for_other_T():
    s = NoiseSchedule.linear(250)
    assert s.betas[0].item() == pytest.approx(4e-4) and s.betas[-1].item() == pytest.approx(0.08)
    # the signal is destroyed to about the same degree as with T = 1000
    assert s.alphas_cumprod[-1].item() == pytest.approx(NoiseSchedule.linear(1000).alphas_cumprod[-1].item(),
                                                        rel=0.5)


def test_cosine_matches_closed_form():
    T, s_off = 1000, 0.008
    s = NoiseSchedule.cosine(T, s=s_off)

    def f(t):
        return math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2

    for t in [0, 10, 500, 900, 990]:
        # code index t is the paper's t + 1: abar = f(t + 1) / f(0)  (Eq. 105)
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas.max().item() == pytest.approx(0.999)  # clipped at the end
    assert (s.betas[:-1] < 0.999).all()


def test_from_betas_and_validation():
    s = NoiseSchedule.from_betas([0.1, 0.2, 0.3])
    assert torch.allclose(s.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504], dtype=torch.float64))
    with pytest.raises(ValueError, match="T must be >= 1"):
        NoiseSchedule.linear(0)
    with pytest.raises(TypeError, match="T must be an int"):
        NoiseSchedule.cosine(10.5)
    with pytest.raises(ValueError, match="betas must lie in"):
        NoiseSchedule.from_betas([0.1, 0.0])
    with pytest.raises(ValueError, match="betas must lie in"):
        NoiseSchedule.from_betas([0.1, float("nan")])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        NoiseSchedule.from_betas([])
    with pytest.raises(ValueError, match="schedule must be"):
        NoiseSchedule.named("sigmoid")


def test_extract_gathers_in_float64_then_casts():
    table = torch.tensor([1.0, 1.0 + 1e-12, 3.0], dtype=torch.float64)
    x = torch.zeros(2, 3, 4, dtype=torch.float32)
    out = extract(table, torch.tensor([2, 0]), x)
    assert out.shape == (2, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == [3.0, 1.0]
