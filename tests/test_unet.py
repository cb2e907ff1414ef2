"""The DDPM U-Net: size, shapes, conditioning, layouts and precisions, compile."""
import math

import pytest
import torch

import fastdiff
from fastdiff.models import unet as unet_mod
from fastdiff.models.unet import UNet, timestep_embedding


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Zero-initialised output layers make a fresh U-Net output 0; give every parameter
    some noise so that the tests can see each input's effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return _perturbed(UNet.preset("tiny")).eval()


def test_ddpm_cifar10_has_35_7m_parameters():
    # Ho et al. 2020, Table/Appendix B: 35.7M parameters for the CIFAR-10 model.
    n = UNet.preset("ddpm-cifar10").num_parameters()
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n


def test_tiny_preset_is_a_few_hundred_thousand_parameters():
    assert 1e5 < UNet.preset("tiny").num_parameters() < 1e6


def test_timestep_embedding_is_eq99():
    # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...), laid out as [sines, cosines]
    d = 16
    t = torch.tensor([0, 1, 7, 999])
    emb = timestep_embedding(t, d)
    for row, pos in enumerate(t.tolist()):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert emb[row, i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert emb[row, d // 2 + i].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_fresh_model_outputs_zero_and_has_gradients():
    # Ho et al. zero-initialise the last conv: the output starts at 0 but the gradient does not
    torch.manual_seed(0)
    model = UNet.preset("tiny")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    out = model(x, t)
    assert out.shape == x.shape and out.abs().max() == 0
    (out - torch.randn_like(out)).pow(2).mean().backward()
    assert model.conv_out.weight.grad.abs().sum() > 0


def test_output_depends_on_t_and_on_distant_pixels(tiny):
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    a, b = tiny(x, torch.tensor([10])), tiny(x, torch.tensor([900]))
    assert (a - b).abs().max() > 1e-3  # time embedding is injected
    # the receptive field spans the image (down/up path + attention): a corner output pixel
    # feels the opposite corner's input
    a[0, :, 0, 0].sum().backward()
    assert x.grad[0, :, -1, -1].abs().sum() > 0


def test_learned_sigma_from_diffusion_or_flag():
    d = fastdiff.GaussianDiffusion(fastdiff.NoiseSchedule.cosine(100), variance="learned_range", loss="hybrid")
    m1 = UNet.preset("tiny", diffusion=d)
    m2 = UNet.preset("tiny", learn_sigma=True)
    x = torch.randn(2, 3, 32, 32)
    assert m1(x, torch.tensor([1, 2])).shape == (2, 6, 32, 32)
    assert m2(x, torch.tensor([1, 2])).shape == (2, 6, 32, 32)
    assert m1.diffusion is d and m1.sample_shape == (3, 32, 32)
    loss = d.training_losses(m1, x)["loss"].mean()
    loss.backward()


@pytest.mark.parametrize("kw", [dict(num_heads=4), dict(num_head_channels=8), dict(use_scale_shift_norm=True)],
                         ids=["num_heads", "num_head_channels", "scale_shift"])
def test_improved_ddpm_options_run_and_change_the_function(kw):
    torch.manual_seed(0)
    base = _perturbed(UNet.preset("tiny")).eval()
    torch.manual_seed(0)
    other = UNet.preset("tiny", **kw).eval()
    try:
        other.load_state_dict(base.state_dict())
    except RuntimeError:  # scale-shift has a wider emb_proj: perturb it on its own
        _perturbed(other)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 500])
    out = other(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out - base(x, t)).abs().max() > 1e-4


def test_multi_head_attention_matches_per_head_softmax():
    # The attention block with 2 heads equals the textbook computation per head:
    # x + proj_out(softmax(q k^T / sqrt(d)) v), q, k, v = qkv(GroupNorm(x)) per position.
    torch.manual_seed(0)
    attn = _perturbed(unet_mod.SelfAttention2d(16, num_heads=2, num_groups=4))
    x = torch.randn(2, 16, 4, 4)
    tokens = torch.nn.functional.group_norm(x, 4, attn.norm.weight, attn.norm.bias, 1e-5).flatten(2).transpose(1, 2)
    q, k, v = attn.qkv(tokens).reshape(2, 16, 3, 2, 8).unbind(2)  # (B, L, heads, d)
    w = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(8), dim=-1)
    o = torch.einsum("bhij,bjhd->bihd", w, v).reshape(2, 16, 16)
    ref = x + attn.proj_out(o).transpose(1, 2).reshape(2, 16, 4, 4)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_class_labels_and_the_null_label(tiny):
    torch.manual_seed(0)
    model = _perturbed(UNet.preset("tiny", num_classes=10)).eval()
    assert model.label_embed.num_embeddings == 11
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    none = model(x, t)
    null = model(x, t, y=torch.full((3,), 10))
    torch.testing.assert_close(none, null)  # y=None is the "no label" row
    assert (model(x, t, y=torch.tensor([0, 1, 2])) - none).abs().max() > 1e-4
    with pytest.raises(ValueError, match="num_classes"):
        tiny(x, t, y=torch.tensor([0, 1, 2]))


def test_channels_last_matches_contiguous(tiny):
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 300])
    ref = tiny(x, t)
    cl = tiny.to(memory_format=torch.channels_last)
    out = cl(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_is_close_to_fp32(tiny):
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 300])
    ref = tiny(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(x, t)
    assert torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_sample_uses_sample_shape_and_diffusion():
    d = fastdiff.GaussianDiffusion(fastdiff.NoiseSchedule.linear(50))
    torch.manual_seed(0)
    model = _perturbed(UNet.preset("tiny", diffusion=d)).eval()
    x = fastdiff.sample(model, steps=3, eta=0, n=2)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()


def test_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="preset"):
        UNet.preset("nope")
    with pytest.raises(ValueError, match="num_groups"):
        UNet(model_channels=20, num_groups=32)
    with pytest.raises(ValueError, match="image_size"):
        UNet(image_size=30)


def test_compile_fullgraph_matches_eager(tiny):
    compiled = fastdiff.compile(tiny, fullgraph=True)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 300])
    torch.testing.assert_close(compiled(x, t), tiny(x, t), atol=1e-4, rtol=1e-4)
