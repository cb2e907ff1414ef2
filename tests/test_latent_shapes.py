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
import torch

import fastdiff
from fastdiff.data import SHAPE_CLASSES
from fastdiff.interop import load_model
from fastdiff.metrics import load_shapes_features
from fastdiff.models import LatentDiffusionModel
from fastdiff.train.features import train_shapes_features

MODEL = Path(__file__).parent / "data" / "shapes32-latent.safetensors"
PER_CLASS = 20
JUDGE_STEPS = 600


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    out = train_shapes_features(tmp_path_factory.mktemp("judge32"), steps=JUDGE_STEPS, seed=1, image_size=32,
                                dataset_size=4000)
    judge = load_shapes_features(out)
    # the judge itself must be good on held-out real images, or its verdicts mean little
    assert judge.record["held_out_accuracy"] >= 0.95, judge.record
    return judge


@pytest.fixture(scope="module")
def model():
    model, info = load_model(MODEL)
    assert isinstance(model, LatentDiffusionModel)  # the export holds the U-Net and its autoencoder
    assert model.num_classes == len(SHAPE_CLASSES)
    assert model.sample_shape == (8, 8, 8) and model.image_shape == (3, 32, 32)
    return model


def _accuracy(judge, model, guidance_scale=None):
    labels = torch.arange(PER_CLASS * model.num_classes) // PER_CLASS
    x = fastdiff.sample(model, n=len(labels), steps=50, eta=0.0, seed=7, y=labels, guidance_scale=guidance_scale)
    assert x.shape == (len(labels), 3, 32, 32)  # decoded images, not latents
    with torch.no_grad():
        predicted = judge.cnn(judge.prepare(x.clamp(-1, 1))).argmax(1)
    correct = (predicted == labels).float()
    return correct.mean().item(), correct.view(model.num_classes, PER_CLASS).mean(1)


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
