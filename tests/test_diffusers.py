"""diffusers interop (#14): imported U-Nets and schedulers compute what diffusers computes,
exported folders load in diffusers, and the round trip is bitwise. Models are built by
diffusers itself with random weights (save_pretrained into tmp_path); nothing is downloaded."""
import math

import pytest
import torch

import fastdiff
from fastdiff import GaussianDiffusion, NoiseSchedule


# --------------------------------------------------------------------------- final abar
def test_final_alpha_cumprod_sets_the_last_ddim_step():
    """DDIM's last step with abar_final: x = sqrt(abar_final) x0 + sqrt(1 - abar_final) eps
    (Eq. 114 with abar_prev = abar_final), x0 and eps from the model's eps at t = 0."""
    s = NoiseSchedule.from_betas(torch.linspace(0.1, 0.2, 4, dtype=torch.float64))
    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 0.1
    eps = 0.3 * torch.ones_like(x_T)
    model = lambda x, t: eps  # noqa: E731
    for final in (1.0, s.alphas_cumprod[0].item(), 0.5):  # 1, diffusers' set_alpha_to_one=False, any
        d = GaussianDiffusion(s, final_alpha_cumprod=final)
        assert d.respace([0, 2]).final_alpha_cumprod == final
        out = fastdiff.sample(model, x_T=x_T, steps=1, diffusion=GaussianDiffusion(
            NoiseSchedule.from_betas(s.betas[:1]), final_alpha_cumprod=final), clip_denoised=False,
            dtype=torch.float64)
        ac = s.alphas_cumprod[0].item()
        x0 = (x_T - math.sqrt(1 - ac) * eps) / math.sqrt(ac)
        torch.testing.assert_close(out, math.sqrt(final) * x0 + math.sqrt(1 - final) * eps)
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        GaussianDiffusion(s, final_alpha_cumprod=0.0)


def test_default_clip_denoised_attribute_is_used_when_clip_is_not_given():
    s = NoiseSchedule.from_betas([0.5])
    x_T = torch.full((1, 1, 2, 2), 3.0)

    class Model(torch.nn.Module):
        default_clip_denoised = False

        def forward(self, x, t):
            return torch.zeros_like(x)

    d = GaussianDiffusion(s)
    unclipped = fastdiff.sample(Model(), x_T=x_T, steps=1, diffusion=d)
    torch.testing.assert_close(unclipped, x_T / math.sqrt(0.5))  # x0 = x_T / sqrt(abar), not clamped
    torch.testing.assert_close(fastdiff.sample(Model(), x_T=x_T, steps=1, diffusion=d, clip_denoised=True),
                               torch.ones_like(x_T))
