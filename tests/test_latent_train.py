"""`fastdiff train --autoencoder`: training on latents, exact resume, a run that stands alone, and
`fastdiff sample / export / eval` on the result; the errors."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastdiff
from fastdiff.cli import main
from fastdiff.data import SHAPE_CLASSES, load_dataset
from fastdiff.errors import InputError, UserError
from fastdiff.interop import export_autoencoder, load_model
from fastdiff.models import AutoencoderKL, LatentDiffusionModel
from fastdiff.train import TrainConfig, load_checkpoint, read_checkpoint_record, train
from fastdiff.train.latent import AUTOENCODER_DIR, LatentData

# f = 2 (two levels), 4 latent channels: 16x16 shapes -> 4x8x8 latents
AE_CONFIG = dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                 mid_block_add_attention=False, scaling_factor=0.7)
FAST = dict(data="shapes", dataset_size=16, image_size=16, batch_size=4, preset="tiny", progress=False,
            sample_steps=2, sample_n=2, T=50, warmup_steps=3, save_every=2, sample_at_end=False)


@pytest.fixture
def ae_folder(tmp_path):
    torch.manual_seed(0)
    ae = AutoencoderKL(**AE_CONFIG)
    return export_autoencoder(ae, tmp_path / "ae")


def _weights(out) -> dict:
    return load_file(str(Path(out) / read_checkpoint_record(out)["weights"]))


def test_train_resume_sample_export_eval(tmp_path, ae_folder, capsys):
    cfg = dict(FAST, autoencoder=str(ae_folder), class_cond=True, prediction="v")
    train(TrainConfig(out=str(tmp_path / "full"), steps=4, **cfg))
    train(TrainConfig(out=str(tmp_path / "half"), steps=2, **cfg))
    train(TrainConfig(out=str(tmp_path / "half"), steps=4, resume=True, **cfg))
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "half")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume is bitwise exact
    run = tmp_path / "half"
    shutil.rmtree(ae_folder)  # the run stands alone: it holds its own copy
    assert (run / AUTOENCODER_DIR / "config.json").is_file()
    model, record = load_checkpoint(run)
    assert isinstance(model, LatentDiffusionModel) and model.unet.conv_in.weight.shape[1] == 4
    assert model.sample_shape == (4, 8, 8) and model.image_shape == (3, 16, 16) and model.num_classes == len(SHAPE_CLASSES)
    assert model.scaling_factor == 0.7 and model.default_guidance_scale == 3.0
    x = fastdiff.sample(model, n=2, steps=3, y=torch.tensor([0, 1]))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()

    png = tmp_path / "s.png"
    assert main(["sample", str(run), "--n", "2", "--steps", "3", "--out", str(png), "--no-progress"]) == 0
    assert "latent diffusion: sampled as 4x8x8 latents" in capsys.readouterr().out
    images = np.load(png.with_suffix(".npz"))["images"]
    assert images.shape == (2, 16, 16, 3)

    exported = tmp_path / "latent.safetensors"
    assert main(["export", str(run), "--out", str(exported)]) == 0
    again, info = load_model(exported)
    assert isinstance(again, LatentDiffusionModel) and again.scaling_factor == 0.7
    kwargs = dict(n=2, steps=3, y=torch.tensor([2, 3]), seed=5)
    assert torch.equal(fastdiff.sample(again, **kwargs), fastdiff.sample(model, **kwargs))

    capsys.readouterr()
    assert main(["eval", "bpd", str(exported), "--data", "shapes", "--n", "2", "--steps", "5", "--batch-size", "2",
                 "--no-progress"]) == 0
    assert "bits/dim of the latents, a bound on the latent likelihood, not on pixels" in capsys.readouterr().out


def test_latents_are_scaled_posterior_samples(tmp_path, ae_folder):
    from fastdiff.models.latent import load_autoencoder_folder

    ae = load_autoencoder_folder(ae_folder)
    ds = load_dataset("shapes", image_size=16, n=8)
    data = LatentData(ds, ae, scaling_factor=0.7)
    x, y = ds.batch(range(8))
    with torch.no_grad():
        posterior = ae.encode(x)
    torch.testing.assert_close(data.mean, posterior.mean)
    z_mean, labels = data.batch([3, 5])
    torch.testing.assert_close(z_mean, 0.7 * posterior.mean[[3, 5]])
    assert torch.equal(labels, y[[3, 5]])
    z1, _ = data.batch([3, 5], torch.Generator().manual_seed(1))
    z2, _ = data.batch([3, 5], torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2) and not torch.equal(z1, z_mean)  # a sample, reproducible from its generator
    eps = (z1 / 0.7 - posterior.mean[[3, 5]]) / posterior.std[[3, 5]]
    assert abs(eps.mean().item()) < 0.2 and abs(eps.std().item() - 1) < 0.2


def test_errors(tmp_path, ae_folder, capsys):
    missing = tmp_path / "nope"
    code = main(["train", "--data", "shapes", "--dataset-size", "8", "--image-size", "16", "--steps", "1",
                 "--out", str(tmp_path / "r"), "--autoencoder", str(missing), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "no such autoencoder folder" in err and str(missing) in err
    with pytest.raises(UserError, match="divisible by the autoencoder's downsampling factor f=2"):
        train(TrainConfig(out=str(tmp_path / "odd"), steps=1, **dict(FAST, image_size=17, autoencoder=str(ae_folder))))
    # a bare autoencoder folder is not a diffusion model
    for argv in (["sample", str(ae_folder), "--n", "1", "--out", str(tmp_path / "x.png")],
                 ["export", str(ae_folder), "--out", str(tmp_path / "x.safetensors")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is an autoencoder" in err and "Traceback" not in err
        assert argv[0] == "export" or "fastdiff train --autoencoder" in err  # and what to do with it


def test_broken_latent_runs_and_files_are_clear_errors(tmp_path, ae_folder, capsys):
    run = tmp_path / "run"
    train(TrainConfig(out=str(run), steps=2, **dict(FAST, autoencoder=str(ae_folder))))
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 2
    assert "--format fastdiff" in capsys.readouterr().err
    exported = tmp_path / "m.safetensors"
    assert main(["export", str(run), "--out", str(exported)]) == 0
    from safetensors import safe_open
    with safe_open(str(exported), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del metadata["autoencoder_config"]
    save_file(tensors, str(tmp_path / "no-ae.safetensors"), metadata=metadata)
    with pytest.raises(InputError, match="lacks 'autoencoder_config'"):
        load_model(tmp_path / "no-ae.safetensors")
    shutil.rmtree(run / AUTOENCODER_DIR)
    with pytest.raises(InputError, match="copy of the autoencoder.*is missing"):
        load_checkpoint(run)


def test_eval_fid_draws_decoded_images(tmp_path, ae_folder, capsys):
    from fastdiff.train.features import train_shapes_features

    run = tmp_path / "run"
    train(TrainConfig(out=str(run), steps=2, **dict(FAST, autoencoder=str(ae_folder))))
    features = train_shapes_features(tmp_path / "features", steps=2, seed=0, image_size=16, dataset_size=64)
    capsys.readouterr()
    assert main(["eval", "fid", str(run), "--data", "shapes", "--n", "4", "--steps", "2", "--batch-size", "4",
                 "--shapes-features", str(features), "--no-kid", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "FID:" in out and "4 generated vs 4 shapes" in out  # 16x16 images drawn, decoded, compared
