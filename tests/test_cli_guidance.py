"""Guidance on the command line: train-classifier, sample --class/--guidance-scale/--classifier."""
import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.cli import main
from fastdiff.data import to_uint8
from fastdiff.train import load_checkpoint
from fastdiff.train.classifier import load_classifier


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("guidance-cli")
    common = ["--data", "shapes", "--dataset-size", "32", "--batch-size", "4", "--T", "20", "--no-progress"]
    assert main(["train", "--out", str(root / "cond"), "--steps", "2", "--sample-steps", "2", "--sample-n", "2",
                 "--class-cond", *common]) == 0
    assert main(["train", "--out", str(root / "uncond"), "--steps", "2", "--sample-steps", "2", "--sample-n", "2",
                 *common]) == 0
    assert main(["train-classifier", "--out", str(root / "clf"), "--steps", "3", "--preset", "tiny",
                 "--data", "shapes", "--batch-size", "4", "--T", "20", "--no-progress"]) == 0
    return root


def test_classifier_free_guidance_from_the_cli(runs, capsys):
    out = runs / "cfg.png"
    assert main(["sample", str(runs / "cond"), "--n", "3", "--steps", "4", "--class", "2", "--guidance-scale", "1.5",
                 "--out", str(out), "--no-progress"]) == 0
    saved = np.load(out.with_suffix(".npz"))
    assert saved["images"].shape == (3, 32, 32, 3) and saved["labels"].tolist() == [2, 2, 2]


def test_classifier_guidance_from_the_cli(runs):
    out = runs / "clf.png"
    assert main(["sample", str(runs / "uncond"), "--n", "4", "--steps", "4", "--classifier", str(runs / "clf"),
                 "--classifier-scale", "2", "--out", str(out), "--no-progress"]) == 0
    saved = np.load(out.with_suffix(".npz"))
    assert saved["labels"].tolist() == [0, 1, 2, 3]  # cycles through the classifier's classes
    # the images are the API's classifier-guided samples, and the classifier moved them
    model, _ = load_checkpoint(runs / "uncond")
    kw = dict(n=4, steps=4, seed=0, y=torch.tensor([0, 1, 2, 3]))
    guided = fastdiff.sample(model, classifier=load_classifier(runs / "clf"), classifier_scale=2.0, **kw)
    assert np.array_equal(saved["images"], to_uint8(guided).permute(0, 2, 3, 1).numpy())
    plain = fastdiff.sample(model, n=4, steps=4, seed=0)  # no classifier: no labels either
    assert not np.array_equal(saved["images"], to_uint8(plain).permute(0, 2, 3, 1).numpy())


def test_guidance_usage_errors(runs, capsys):
    code = main(["sample", str(runs / "uncond"), "--n", "2", "--steps", "2", "--guidance-scale", "1",
                 "--out", str(runs / "x.png"), "--no-progress"])
    assert code == 2 and "class-conditional" in capsys.readouterr().err
    code = main(["sample", str(runs / "cond"), "--n", "2", "--steps", "2", "--class", "99",
                 "--out", str(runs / "x.png"), "--no-progress"])
    assert code == 2 and "--class must be in" in capsys.readouterr().err
    code = main(["sample", str(runs / "uncond"), "--n", "2", "--steps", "2", "--classifier", str(runs / "nope"),
                 "--out", str(runs / "x.png"), "--no-progress"])
    assert code == 1 and "no classifier record" in capsys.readouterr().err
