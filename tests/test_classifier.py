"""The noisy classifier of classifier guidance: model, training, saving, loading."""
import numpy as np
import pytest
import torch

from fastdiff import GaussianDiffusion, NoiseSchedule
from fastdiff.train.classifier import ClassifierConfig, load_classifier, train_classifier
from fastdiff.sampling.guidance import classifier_log_prob_grad
from fastdiff.models.classifier import NoisyClassifier


def _two_colour_npz(path, n=256, seed=0):
    """Class 0 reddish, class 1 bluish images: separable at low noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 60, (n, 16, 16, 3))
    x[y == 0, :, :, 0] += 180
    x[y == 1, :, :, 2] += 180
    np.savez(path, x=x.astype(np.uint8), y=y)
    return x, y


def test_classifier_shapes_and_gradient():
    m = NoisyClassifier.preset("tiny", num_classes=4, image_size=16)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 400, 999])
    logits = m(x, t)
    assert logits.shape == (3, 4)
    g = classifier_log_prob_grad(m, x, t, torch.tensor([0, 1, 3]))
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        NoisyClassifier(num_classes=1)
    with pytest.raises(ValueError, match="preset must be one of"):
        NoisyClassifier.preset("huge", 3)


def test_train_save_load_and_learn(tmp_path):
    _two_colour_npz(tmp_path / "colours.npz")
    cfg = ClassifierConfig(data=str(tmp_path / "colours.npz"), out=str(tmp_path / "clf"), steps=40,
                           preset="tiny", batch_size=32, lr=3e-3, T=100, image_size=16, progress=False)
    out = train_classifier(cfg)
    model = load_classifier(out)
    x, y = _two_colour_npz(tmp_path / "held_out.npz", n=128, seed=1)
    x0 = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    d = GaussianDiffusion(NoiseSchedule.linear(100))
    t = torch.randint(0, 20, (128,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = model(d.q_sample(x0, t), t).argmax(1)
    assert (pred.numpy() == y).mean() >= 0.9
    # the saved weights are the trained ones
    again = load_classifier(out)
    torch.testing.assert_close(again(x0[:4], t[:4]), model(x0[:4], t[:4]))


def test_bad_classifier_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no classifier record"):
        load_classifier(tmp_path)
    (tmp_path / "classifier.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable classifier"):
        load_classifier(tmp_path)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ClassifierConfig(steps=0).validate()
    np.savez(tmp_path / "unlabelled.npz", x=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="has no labels"):
        train_classifier(ClassifierConfig(data=str(tmp_path / "unlabelled.npz"), out=str(tmp_path / "o"),
                                          steps=1, image_size=8, progress=False))
