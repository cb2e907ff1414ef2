"""The independent judge of the shipped class-conditional models (test_guidance_shapes,
test_latent_shapes): a ShapesCNN trained from scratch on real images only, on another random
stream of the shapes generator than the models saw, and the accuracy with which it recognises
the requested class in a model's samples."""
import torch

import fastdiff
from fastdiff.metrics import load_shapes_features
from fastdiff.train.features import train_shapes_features


def train_judge(folder, image_size: int, steps: int):
    out = train_shapes_features(folder, steps=steps, seed=1, image_size=image_size, dataset_size=4000)
    judge = load_shapes_features(out)
    # the judge itself must be good on held-out real images, or its verdicts mean little
    assert judge.record["held_out_accuracy"] >= 0.95, judge.record
    return judge


def judged_accuracy(judge, model, per_class: int, guidance_scale=None):
    """Sample `per_class` images of each class (row k: class k; DDIM-50, eta 0, seed 7) at
    `guidance_scale` (None: the model's default); the samples, the fraction judged the requested
    class, and that fraction per class."""
    labels = torch.arange(per_class * model.num_classes) // per_class
    x = fastdiff.sample(model, n=len(labels), steps=50, eta=0.0, seed=7, y=labels, guidance_scale=guidance_scale)
    with torch.no_grad():
        predicted = judge.cnn(judge.prepare(x.clamp(-1, 1))).argmax(1)
    correct = (predicted == labels).float()
    return x, correct.mean().item(), correct.view(model.num_classes, per_class).mean(1)
