"""The fastdiff command line: help, usage errors, train -> sample -> eval bpd, demo."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import fastdiff
from fastdiff.cli import main

# Subprocesses import the installed fastdiff: they run outside the source tree, whose
# fastdiff/ has no compiled core (with `pip install .` the build lives in site-packages).
ENV = dict(os.environ)


@pytest.mark.parametrize("argv", [[], ["train"], ["sample"], ["eval"], ["eval", "bpd"], ["demo"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    assert "usage: fastdiff" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    ([], "COMMAND"),
    (["train", "--data", "shapes", "--steps", "3"], "--out"),
    (["train", "--data", "shapes", "--out", "x", "--steps", "0"], "positive integer"),
    (["train", "--data", "shapes", "--out", "x", "--steps", "3", "--loss", "l1"], "invalid choice"),
    (["sample", "d", "--n", "2", "--steps", "2", "--eta", "-1", "--out", "x.png"], "--eta"),
    (["nope"], "invalid choice"),
])
def test_usage_errors_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_missing_data_is_a_clean_error(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "missing.npz" in err and "Traceback" not in err


def test_sample_without_checkpoint_is_a_clean_error(tmp_path, capsys):
    code = main(["sample", str(tmp_path), "--n", "1", "--steps", "1", "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert code == 1 and "checkpoint" in err and "Traceback" not in err


def test_train_sample_eval_round_trip(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "shapes", "--dataset-size", "16", "--out", str(run), "--steps", "2",
                 "--batch-size", "2", "--T", "20", "--sample-steps", "2", "--sample-n", "2", "--class-cond",
                 "--no-progress"]) == 0
    assert "trained to step 2" in capsys.readouterr().out
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "--n", "3", "--steps", "4", "--eta", "0.5", "--out", str(out),
                 "--sampler", "ddpm", "--no-progress"]) == 0
    assert Image.open(out).size[0] > 32
    z = np.load(tmp_path / "s.npz")
    assert z["images"].shape == (3, 32, 32, 3) and z["images"].dtype == np.uint8
    assert z["labels"].tolist() == [0, 1, 2]
    # the same seed gives the same samples; --no-ema selects other weights
    assert main(["sample", str(run), "--n", "3", "--steps", "4", "--eta", "0.5", "--out", str(tmp_path / "t.png"),
                 "--sampler", "ddpm", "--no-progress"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "t.npz")["images"], z["images"])
    capsys.readouterr()
    assert main(["eval", "bpd", str(run), "--data", "shapes", "--n", "4", "--steps", "5", "--batch-size", "2",
                 "--json", str(tmp_path / "bpd.json"), "--no-progress"]) == 0
    line = capsys.readouterr().out
    assert "bits/dim:" in line and "±" in line and "T=5 (respaced from 20)" in line
    res = json.loads((tmp_path / "bpd.json").read_text())
    assert res["n"] == 4 and np.isfinite(res["bpd"]) and res["bpd"] > 0 and res["ci95"] >= 0


def test_python_dash_m_and_resume(tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "fastdiff", "train", "--data", "shapes", "--dataset-size", "8", "--out", str(run),
            "--batch-size", "2", "--T", "10", "--sample-steps", "2", "--sample-n", "1", "--no-progress"]
    p = subprocess.run(base + ["--steps", "1"], env=ENV, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    p = subprocess.run(base + ["--steps", "2", "--resume"], env=ENV, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert p.returncode == 0 and "resumed from" in p.stderr and "step 2" in p.stdout, p.stderr[-2000:]


def test_demo_with_a_seconds_long_budget(tmp_path, capsys):
    t0 = time.time()
    assert main(["demo", "--out", str(tmp_path), "--minutes", "0.5", "--n", "4", "--dataset-size", "200"]) == 0
    elapsed = time.time() - t0
    assert elapsed < 0.5 * 60 + 45, elapsed  # the budget holds (with slack for a loaded machine)
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert speed["train_steps"] >= 1 and speed["train_steps_per_s"] > 0 and speed["sample_images_per_s"] > 0
    for f in ("samples.png", "samples.npz", "loss.png", "README.md"):
        assert (tmp_path / f).exists(), f
    assert "fastdiff demo: done" in capsys.readouterr().out


def test_latent_demo_trains_its_autoencoder_and_samples_through_it(tmp_path, capsys):
    # without --autoencoder: an autoencoder for 40% of the budget, then the latent U-Net
    t0 = time.time()
    assert main(["demo", "--latent", "--out", str(tmp_path), "--minutes", "1", "--n", "10", "--dataset-size", "200",
                 "--threads", "1"]) == 0
    elapsed = time.time() - t0
    assert elapsed < 60 + 45, elapsed  # the budget holds (with slack for a loaded machine)
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert speed["latent_shape"] == [8, 8, 8] and speed["train_steps"] >= 1
    assert speed["autoencoder"] == str(tmp_path / "autoencoder")
    model, _ = fastdiff.load_model(tmp_path / "latent")
    assert model.sample_shape == (8, 8, 8) and model.default_guidance_scale > 0
    # one row of ten decoded 32x32 images (2-pixel borders), the grid scaled 3x
    assert Image.open(tmp_path / "samples.png").size == (3 * (2 + 10 * 34), 3 * (2 + 34))
    assert "fastdiff demo --latent: done" in capsys.readouterr().out
