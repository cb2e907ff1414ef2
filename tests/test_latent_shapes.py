"""A latent diffusion model of the embedded 32x32 shapes, judged by an independent classifier.

The model is tests/data/shapes32-latent.safetensors: a class-conditional U-Net that fastdiff trained
(`fastdiff train --autoencoder`) on the 8x8x8 latents of the shipped f = 4 autoencoder
tests/data/shapes32-ae (trained by `fastdiff train-autoencoder` on the same shapes, 32.2 dB), with
label dropout for classifier-free guidance, exported by `fastdiff export` with that autoencoder in the
same file; tests/data/shapes32-latent.json records the commands and the run.
Training takes 8 minutes on an idle 2-core CPU (tens under load), too long for every CI run, so the weights are shipped. What this
test checks is what a user gets: sampled as latents at the model's default guidance scale and
decoded, the requested class comes out.

The judge is trained here, from scratch, on real 32x32 images only: a ShapesCNN (neither a U-Net nor
an autoencoder) on another random stream of the shapes generator. It never sees a generated or a
reconstructed image and shares nothing with the model under test but the data's law.
"""
from pathlib import Path

import pytest

from fastdiff.data import SHAPE_CLASSES
from fastdiff.interop import load_model
from fastdiff.models import LatentDiffusionModel
from shapes_judge import judged_accuracy, train_judge

MODEL = Path(__file__).parent / "data" / "shapes32-latent.safetensors"
PER_CLASS = 20
JUDGE_STEPS = 600


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return train_judge(tmp_path_factory.mktemp("judge32"), image_size=32, steps=JUDGE_STEPS)


@pytest.fixture(scope="module")
def model():
    model, info = load_model(MODEL)
    assert isinstance(model, LatentDiffusionModel)  # the export holds the U-Net and its autoencoder
    assert model.num_classes == len(SHAPE_CLASSES)
    assert model.sample_shape == (8, 8, 8) and model.image_shape == (3, 32, 32)
    return model


def _accuracy(judge, model, guidance_scale=None):
    x, accuracy, per_class = judged_accuracy(judge, model, PER_CLASS, guidance_scale)
    assert x.shape == (len(x), 3, 32, 32)  # decoded images, not latents
    return accuracy, per_class


@pytest.fixture(scope="module")
def guided(judge, model):
    assert model.default_guidance_scale > 0
    return _accuracy(judge, model)  # guidance_scale=None: the model's default


@pytest.mark.slow
def test_latent_samples_are_of_the_requested_class(guided):
    accuracy, per_class = guided
    worst = int(per_class.argmin())
    assert accuracy >= 0.80, (f"{accuracy:.1%} of the decoded samples judged the requested class; per class "
                              f"{per_class.tolist()} (worst: {SHAPE_CLASSES[worst]})")


@pytest.mark.slow
def test_guidance_is_what_makes_the_class_come_out(guided, judge, model):
    """The same model and noise without guidance (w = 0, plain p(z | y)) are judged right far less
    often (see tests/data/shapes32-latent.json): guidance, not only the conditional model, is what
    the check above measures."""
    unguided, _ = _accuracy(judge, model, guidance_scale=0.0)
    assert guided[0] >= unguided + 0.1, (guided[0], unguided)
