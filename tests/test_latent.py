"""Latent diffusion (fastdiff.models.LatentDiffusionModel) against the oracle kit.

The "autoencoder" here is exactly invertible: a fixed rotation Q of the channels (f = 1), z = Q x,
x = Q^T z. The latent law is then the pixel law rotated (and scaled), whose oracle is exact too, so
the latent pipeline (sample latents, decode) must give what the pixel pipeline gives: the same
images from the same (rotated) noise for every deterministic sampler, the same law for the
stochastic ones, the same guided samples. The wrapper may add no error.
"""
import math

import pytest
import torch
from torch import nn

import fastdiff
from fastdiff import GaussianDiffusion, NoiseSchedule
from fastdiff.models import LatentDiffusionModel
from fastdiff.sampling import SAMPLERS
from fastdiff.testing import GaussianMixture

from test_sampling import _check_mixture

SHAPE = (2, 1, 1)  # a 2-d law laid out as 2 channels of a 1x1 image: Q mixes the channels
DETERMINISTIC = ("ddim", "euler", "heun", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "unipc", "ode")
STOCHASTIC = ("ddpm", "sde", "pc")


class _Posterior:
    def __init__(self, mean):
        self.mean, self.std = mean, torch.zeros_like(mean)

    def sample(self, generator=None):
        return self.mean + self.std * torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)


class RotationAutoencoder(nn.Module):
    """The AutoencoderKL protocol with an exactly invertible map: z = Q x on the channels, f = 1."""

    def __init__(self, rotation: torch.Tensor, scaling_factor: float = 1.0, shift_factor=None):
        super().__init__()
        self.rotation = nn.Parameter(rotation.clone(), requires_grad=False)  # a parameter: .double() etc. convert it
        self.in_channels = self.latent_channels = rotation.shape[0]
        self.downsampling_factor = 1
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor

    def encode(self, x):
        return _Posterior(torch.einsum("ij,bjhw->bihw", self.rotation, x))

    def decode(self, z):
        return torch.einsum("ji,bjhw->bihw", self.rotation, z)


def rotation(angle: float = 0.7) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def latent_law(mix: GaussianMixture, q: torch.Tensor, scale: float = 1.0, shift: float = 0.0) -> GaussianMixture:
    """The law of scale * (Q x - shift) for x ~ mix, laid out as SHAPE."""
    classes = None if mix.classes is None else mix.classes.tolist()
    return GaussianMixture(scale * (mix.means @ q.T - shift), scale ** 2 * q @ mix.covariances @ q.T,
                           mix.weights.tolist(), sample_shape=SHAPE, classes=classes)


def pixel_law(mix: GaussianMixture) -> GaussianMixture:
    classes = None if mix.classes is None else mix.classes.tolist()
    return GaussianMixture(mix.means, mix.covariances, mix.weights.tolist(), sample_shape=SHAPE, classes=classes)


def oracle_unet(law: GaussianMixture, diffusion: GaussianDiffusion):
    """The oracle as a U-Net of the law's space: it carries its diffusion (and classes)."""
    model = law.model(diffusion.schedule, diffusion.prediction)
    model.diffusion = diffusion
    return model


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule.linear(1000)


def _pair(mix, linear, prediction="eps", scale=1.0, shift=0.0, q=None):
    """(pixel oracle, latent model of the same law, rotation)."""
    q = rotation() if q is None else q
    d = GaussianDiffusion(linear, prediction=prediction)
    pixel = oracle_unet(pixel_law(mix), d)
    ae = RotationAutoencoder(q, scaling_factor=scale, shift_factor=shift)
    latent = LatentDiffusionModel(oracle_unet(latent_law(mix, q, scale, shift), d), ae)
    return pixel, latent, q


def test_every_sampler_is_known():
    assert set(DETERMINISTIC) | set(STOCHASTIC) == set(SAMPLERS)


@pytest.mark.parametrize("sampler", DETERMINISTIC)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_deterministic_samplers_give_the_pixel_pipelines_images(linear, sampler, prediction):
    """Same noise (rotated into latent space), same images after decoding, to float64 rounding."""
    mix = GaussianMixture.three_component_2d()
    # The adaptive ODE solver's error norm is elementwise (rtol |y|), not rotation invariant: a
    # generic rotation changes its step sizes, so its solutions differ by its global error (~1e-2 at
    # rtol 1e-6). A quarter turn permutes |y|'s elements: the same steps, the same solution.
    q = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64) if sampler == "ode" else None
    pixel, latent, q = _pair(mix, linear, prediction, q=q)
    x_T = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    extra = dict(rtol=1e-5, atol=1e-5) if sampler == "ode" else {}
    want = fastdiff.sample(pixel, x_T=x_T, steps=12, sampler=sampler, clip_denoised=False, **extra)
    z_T = latent.autoencoder.encode(x_T).mean  # Q x_T: standard normal again
    got = fastdiff.sample(latent, x_T=z_T, steps=12, sampler=sampler, **extra)  # no clipping by default
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_wrapper_is_the_unet_then_the_decoder(linear, sampler):
    """Every sampler, seeded noise, a scaled and shifted latent space: fastdiff.sample(latent model)
    is exactly its U-Net sampled in latent space, then decoded."""
    mix = GaussianMixture.three_component_2d()
    _, latent, _ = _pair(mix, linear, scale=2.5, shift=0.3)
    extra = dict(rtol=1e-4, atol=1e-4) if sampler == "ode" else {}
    images = fastdiff.sample(latent, n=16, steps=8, sampler=sampler, seed=3, dtype=torch.float64, **extra)
    z = fastdiff.sample(latent.unet, n=16, steps=8, sampler=sampler, seed=3, dtype=torch.float64,
                        clip_denoised=False, **extra)
    assert torch.equal(images, latent.autoencoder.decode(z / 2.5 + 0.3))


@pytest.mark.parametrize("sampler, steps", [("ddpm", 1000), ("sde", 250), ("dpmpp_2m", 50)])
def test_decoded_samples_follow_the_pixel_law(linear, sampler, steps):
    """The oracle kit's law test through a scaled, shifted, rotated latent space."""
    mix = GaussianMixture.three_component_2d()
    _, latent, _ = _pair(mix, linear, scale=2.5, shift=0.3)
    x = fastdiff.sample(latent, n=2048, steps=steps, sampler=sampler, seed=11, dtype=torch.float64)
    assert x.shape == (2048, *SHAPE)
    _check_mixture(mix, x.reshape(2048, 2))


def test_classifier_free_guidance_matches_the_pixel_pipeline(linear):
    mix = GaussianMixture.two_class_2d()
    pixel, latent, _ = _pair(mix, linear)
    assert latent.num_classes == 2
    x_T = torch.randn(128, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z_T = latent.autoencoder.encode(x_T).mean
    y = torch.arange(128) % 2
    for w in (0.0, 3.0):
        want = fastdiff.sample(pixel, x_T=x_T, steps=20, y=y, guidance_scale=w, clip_denoised=False)
        got = fastdiff.sample(latent, x_T=z_T, steps=20, y=y, guidance_scale=w)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_default_guidance_scale_is_the_unets(linear):
    mix = GaussianMixture.two_class_2d()
    pixel, latent, _ = _pair(mix, linear)
    latent.unet.default_guidance_scale = 2.0
    latent = LatentDiffusionModel(latent.unet, latent.autoencoder)
    x_T = torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = fastdiff.sample(latent, x_T=latent.autoencoder.encode(x_T).mean, steps=10, y=1)
    want = fastdiff.sample(pixel, x_T=x_T, steps=10, y=1, guidance_scale=2.0, clip_denoised=False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler"])
def test_classifier_guidance_with_a_classifier_of_latents(linear, sampler):
    """The exact classifier of the latent law guides the latent model as the pixel classifier
    guides the pixel model: grad_z log p(y | z) = Q grad_x log p(y | x)."""
    base = GaussianMixture.two_class_2d()
    unlabelled = GaussianMixture(base.means, base.covariances, base.weights.tolist())  # no num_classes
    pixel, latent, q = _pair(unlabelled, linear)
    pixel_classifier = pixel_law(base).classifier(linear)
    latent_classifier = latent_law(base, q).classifier(linear)
    x_T = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z_T = latent.autoencoder.encode(x_T).mean
    kwargs = dict(steps=20, sampler=sampler, y=1, classifier_scale=2.0, seed=9)
    want = fastdiff.sample(pixel, x_T=x_T, classifier=pixel_classifier, clip_denoised=False, **kwargs)
    got = fastdiff.sample(latent, x_T=z_T, classifier=latent_classifier, **kwargs)
    if sampler == "ddpm":  # the ancestral noise is drawn in latent space: equal in law, not in value
        assert (base.class_log_posterior(got.reshape(64, 2), torch.ones(64, 1, dtype=torch.float64))[:, 1].exp()
                > 0.5).float().mean() > 0.8
    else:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_decoding_is_batched_and_in_the_models_precision(linear):
    mix = GaussianMixture.three_component_2d()
    _, latent, _ = _pair(mix, linear)
    z = torch.randn(10, *SHAPE, dtype=torch.float64)
    whole = latent.decode_latents(z)
    assert torch.equal(latent.decode_latents(z, batch_size=3), whole)
    calls = []
    decode = latent.autoencoder.decode
    latent.autoencoder.decode = lambda v: calls.append(v.shape[0]) or decode(v)
    latent.decode_batch_size = 4
    latent.decode_latents(z)
    assert calls == [4, 4, 2]
    # float32 weights: the decoder runs in float32, the result comes back in z's dtype
    latent.float()
    out = latent.decode_latents(z)
    assert out.dtype == torch.float64 and torch.allclose(out, whole, atol=1e-6)


def test_bad_input_is_a_clear_error(linear):
    mix = GaussianMixture.three_component_2d()
    _, latent, q = _pair(mix, linear)
    three = RotationAutoencoder(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="latent shape mismatch.*2-channel.*latent_channels=3"):
        LatentDiffusionModel(latent.unet, three)
    with pytest.raises(TypeError, match="protocol"):
        LatentDiffusionModel(latent.unet, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="scaling_factor must be a finite number > 0"):
        LatentDiffusionModel(latent.unet, latent.autoencoder, scaling_factor=0.0)
    with pytest.raises(ValueError, match=r"latent shape mismatch: z must be latents \(B, 2, 1, 1\)"):
        latent.decode_latents(torch.zeros(2, 3, 1, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"latent shape mismatch: x must be images \(B, 2, 1, 1\)"):
        latent.encode_images(torch.zeros(2, 2, 4, 4, dtype=torch.float64))


def test_optimize_decodes_under_the_models_bf16_autocast():
    """fastdiff.optimize(latent model, precision="bf16") runs the decoder under the same autocast
    as the U-Net (not in fp32 beside it)."""
    from fastdiff.models import AutoencoderKL

    torch.manual_seed(0)
    ae = AutoencoderKL(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, mid_block_add_attention=False)
    model = LatentDiffusionModel(fastdiff.UNet.preset("tiny", image_size=8, in_channels=4), ae)
    fast = fastdiff.optimize(model, precision="bf16", compile=False, channels_last=False)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = ae.decode(z / model.scaling_factor + 0.0).float()
    got = fast.decode_latents(z)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert not torch.equal(got, model.decode_latents(z))  # fp32 decoding differs: the autocast is in effect
    x = fastdiff.sample(fast, n=2, steps=2)  # the whole pipeline through the optimized model
    assert x.shape == (2, 3, 16, 16)
