"""`fastdiff train-autoencoder` (fastdiff.train.autoencoder): exact resume, PSNR and the latent scaling
factor against closed forms, the GAN and LPIPS terms, the export, and bad input."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fastdiff
from fastdiff.cli import main
from fastdiff.models import AutoencoderKL
from fastdiff.models.autoencoder import PatchDiscriminator
from fastdiff.train.autoencoder import (AutoencoderConfig, autoencoder_terms, discriminator_hinge_loss,
                                        latent_scaling_factor, psnr, train_autoencoder)

# The smallest run that exercises every part: 16x16 shapes, f = 2, a 2-level 8/16-wide autoencoder.
TINY = dict(data="shapes", image_size=16, dataset_size=48, batch_size=4, block_out_channels=(8, 16),
            latent_channels=2, norm_num_groups=4, eval_n=8, scale_n=16, recon_n=2, progress=False, device="cpu",
            lr=1e-3, warmup_steps=2, disc_channels=8)


def _tiny_ae(latent=2):
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), latent_channels=latent, norm_num_groups=4,
                         layers_per_block=1).eval()


def _run(tmp_path, name, **kw):
    config = AutoencoderConfig(out=str(tmp_path / name), **{**TINY, **kw})
    return train_autoencoder(config)


# --------------------------------------------------------------------------- exact resume
def test_resume_equals_an_uninterrupted_run_bitwise(tmp_path):
    # the GAN starts mid-way (step 2), so the discriminator and its optimizer go through the checkpoint too
    kw = dict(gan_weight=0.1, gan_start=2, save_every=3, lr_decay_start=4)
    whole = _run(tmp_path, "whole", steps=6, **kw)
    first = _run(tmp_path, "split", steps=3, **kw)
    assert first.step == 3
    again = _run(tmp_path, "split", steps=6, resume=True, **kw)
    assert whole.status == again.status == "done" and again.step == 6
    a = load_file(str(tmp_path / "whole" / "ckpt-00000006.safetensors"))
    b = load_file(str(tmp_path / "split" / "ckpt-00000006.safetensors"))
    assert sorted(a) == sorted(b)
    assert any(k.startswith("disc.") for k in a) and any(k.startswith("doptim.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert whole.psnr_db == again.psnr_db and whole.scaling_factor == again.scaling_factor
    # the resumed log holds each step once, as the uninterrupted one
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(6))


def test_export_is_the_ema_autoencoder_with_its_scaling_factor(tmp_path):
    result = _run(tmp_path, "run", steps=3, save_every=100)
    out = tmp_path / "run"
    ae, info = fastdiff.load_model(out)
    assert isinstance(ae, AutoencoderKL)
    assert ae.scaling_factor == pytest.approx(result.scaling_factor, rel=1e-12)
    ema = load_file(str(out / "ckpt-00000003.safetensors"))
    for k, v in ae.state_dict().items():
        assert torch.equal(v, ema["ema." + k]), k
    config = json.loads((out / "config.json").read_text())
    assert config["_fastdiff"]["held_out_psnr_db"] == pytest.approx(result.psnr_db)
    assert (out / "recon" / "step-00000003.png").is_file() and (out / "loss.png").is_file()
    diffusers = pytest.importorskip("diffusers")
    peer = diffusers.AutoencoderKL.from_pretrained(str(out)).eval()
    assert peer.config.scaling_factor == pytest.approx(result.scaling_factor)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(peer(x).sample, ae(x), atol=1e-4)


# --------------------------------------------------------------------------- measures vs closed forms
def test_psnr_closed_form():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), -0.5)])
    # MSE 0.01 and 0.25 in [-1, 1], i.e. 0.0025 and 0.0625 in [0, 1]: PSNR = 10 log10(1 / MSE_[0,1])
    assert psnr(y, x).tolist() == pytest.approx([10 * math.log10(1 / 0.0025), 10 * math.log10(1 / 0.0625)],
                                                abs=1e-6)  # 0.1 in float32
    a, b = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)  # random images in [0, 1]
    expected = [10 * math.log10(1.0 / float(((a[i] - b[i]) ** 2).mean())) for i in range(3)]
    assert psnr(a * 2 - 1, b * 2 - 1).tolist() == pytest.approx(expected, rel=1e-6)
    assert math.isinf(float(psnr(x, x)[0]))
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:1])


def test_scaling_factor_against_hand_computations():
    ae = _tiny_ae(latent=4)
    x = torch.rand(64, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        # q(z|x) made known exactly: mean = channel constants 0, 1, 2, 3 and std 0.5 everywhere, so the
        # latents' variance is that of the constants (1.25) plus 0.25: the factor is 1 / sqrt(1.5)
        ae.quant_conv.weight.zero_()
        ae.quant_conv.bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0] + [math.log(0.25)] * 4))
    factor = latent_scaling_factor(ae, x, batch_size=24, seed=0)
    assert factor == pytest.approx(1 / math.sqrt(1.5), rel=0.02)  # 16384 draws: ~0.6 % sampling error
    ae = _tiny_ae(latent=4)
    with torch.no_grad():  # std 3e-7 (logvar clamped at -30): the latents are the posterior means
        ae.quant_conv.weight[4:].zero_()
        ae.quant_conv.bias[4:].fill_(-40.0)
        means = np.concatenate([ae.encode(x[i:i + 1]).mean.double().numpy().ravel() for i in range(64)])
    assert latent_scaling_factor(ae, x, batch_size=24) == pytest.approx(1 / np.std(means, ddof=1), rel=1e-5)


def test_hinge_loss_closed_form():
    class Fixed(torch.nn.Module):
        def forward(self, x):  # logits 2 for the real batch (x > 0), -0.5 for the fake one
            return torch.where(x.mean() > 0, torch.tensor(2.0), torch.tensor(-0.5)).expand(x.shape[0], 1, 2, 2)
    real, fake = torch.ones(2, 3, 4, 4), -torch.ones(2, 3, 4, 4)
    # 0.5 * (relu(1 - 2) + relu(1 + (-0.5))) = 0.25
    assert float(discriminator_hinge_loss(Fixed(), real, fake)) == pytest.approx(0.25)


# --------------------------------------------------------------------------- GAN and LPIPS
class _TinyPerceptual(torch.nn.Module):
    """A stand-in for an LPIPS network: a distance between 2x2-average-pooled images, per image."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        pa = torch.nn.functional.avg_pool2d(a, 2)
        pb = torch.nn.functional.avg_pool2d(b, 2)
        return (pa - pb).pow(2).mean(dim=(1, 2, 3)) * 5.0


def _lpips_file(tmp_path):
    path = tmp_path / "lpips.pt"
    torch.jit.script(_TinyPerceptual()).save(str(path))
    return path


def test_lpips_and_gan_terms_enter_the_loss(tmp_path):
    ae = _tiny_ae()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    config = AutoencoderConfig(**{**TINY, "lpips_weight": 0.7, "gan_weight": 0.3, "kl_weight": 1e-3})
    lpips = torch.jit.load(str(_lpips_file(tmp_path)))
    torch.manual_seed(1)
    disc = PatchDiscriminator(3, 8)
    with torch.no_grad():
        plain = autoencoder_terms(ae, x, config, torch.Generator().manual_seed(0))
        full = autoencoder_terms(ae, x, config, torch.Generator().manual_seed(0), lpips=lpips, disc=disc)
    x_rec = plain["x_rec"]
    assert torch.equal(full["x_rec"], x_rec)
    assert float(full["lpips"]) == pytest.approx(float(_TinyPerceptual()(x, x_rec).mean()), rel=1e-6)
    assert float(full["gan"]) == pytest.approx(float(-disc(x_rec).mean()), rel=1e-6)
    rec = float((x_rec - x).abs().mean())
    assert float(plain["rec"]) == pytest.approx(rec, rel=1e-6)
    assert float(plain["loss"]) == pytest.approx(rec + 1e-3 * float(plain["kl"]) / (3 * 16 * 16), rel=1e-6)
    assert float(full["loss"]) == pytest.approx(
        float(plain["loss"]) + 0.7 * float(full["lpips"]) + 0.3 * float(full["gan"]), rel=1e-6)


def test_gan_and_lpips_runs_train_differently(tmp_path):
    plain = _run(tmp_path, "plain", steps=3, save_every=100)
    lp = _run(tmp_path, "lpips", steps=3, save_every=100, lpips=str(_lpips_file(tmp_path)), lpips_weight=5.0)
    gan = _run(tmp_path, "gan", steps=3, save_every=100, gan_weight=0.5, gan_start=1)
    log = [json.loads(line) for line in (tmp_path / "gan" / "log.jsonl").read_text().splitlines()]
    assert "gan" not in log[0] and "disc" not in log[0]  # before --gan-start
    assert all("gan" in r and "disc" in r for r in log[1:])
    assert all("lpips" in json.loads(line) for line in (tmp_path / "lpips" / "log.jsonl").read_text().splitlines())
    weights = {r: load_file(str(tmp_path / r / "ckpt-00000003.safetensors")) for r in ("plain", "lpips", "gan")}
    key = "model.decoder.conv_out.weight"
    assert not torch.equal(weights["plain"][key], weights["lpips"][key])
    assert not torch.equal(weights["plain"][key], weights["gan"][key])
    # the GAN only starts at step 1: step 0 was the plain run's
    assert plain.losses[0] == gan.losses[0] and plain.losses[1] != gan.losses[1]
    assert lp.status == "done"


# --------------------------------------------------------------------------- bad input
BASE = ["train-autoencoder", "--data", "shapes", "--image-size", "16", "--dataset-size", "16", "--steps", "1",
        "--block-out-channels", "8,16", "--norm-num-groups", "4", "--eval-n", "4", "--scale-n", "4",
        "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("args, rc, words", [
    (["--loss", "l3"], 2, ["--loss", "l3"]),
    (["--block-out-channels", "8,x"], 2, ["--block-out-channels", "8,x"]),
    (["--kl-weight", "-1"], 2, ["--kl-weight", "-1"]),
    (["--image-size", "18", "--block-out-channels", "8,16,16"], 2, ["--image-size", "18", "f = 4"]),
    (["--norm-num-groups", "3"], 2, ["--norm-num-groups", "3"]),
    (["--lpips", "no-such-file.pt"], 1, ["--lpips", "no-such-file.pt"]),
    (["--resume", "--overwrite"], 2, ["--resume", "--overwrite"]),
], ids=["loss", "widths", "kl", "image-size", "groups", "lpips-missing", "resume-overwrite"])
def test_bad_input_errors(tmp_path, capsys, args, rc, words):
    assert _main(BASE + ["--out", str(tmp_path / "run")] + args) == rc
    err = capsys.readouterr().err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "run" / "checkpoint.json").exists()


def _main(argv):
    """The exit code of the command line (argparse's own errors exit with 2)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_command_line_run(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(BASE + ["--out", str(out), "--steps", "2"]) == 0
    said = capsys.readouterr().out
    assert "PSNR" in said and "scaling factor" in said
    ae, _ = fastdiff.load_model(out)
    recorded = json.loads((out / "config.json").read_text())
    assert ae.scaling_factor == recorded["scaling_factor"] and recorded["_fastdiff"]["step"] == 2
    assert main(BASE + ["--out", str(out), "--steps", "3", "--resume"]) == 0
    assert json.loads((out / "config.json").read_text())["_fastdiff"]["step"] == 3


def test_bad_files_errors(tmp_path, capsys):
    bad = tmp_path / "not-torchscript.pt"
    bad.write_bytes(b"not a model")
    assert main(BASE + ["--out", str(tmp_path / "a"), "--lpips", str(bad)]) == 1
    assert "not a TorchScript module" in capsys.readouterr().err
    wrong = tmp_path / "wrong.pt"
    torch.jit.script(torch.nn.Identity()).save(str(wrong))  # one argument: cannot compare two images
    assert main(BASE + ["--out", str(tmp_path / "b"), "--lpips", str(wrong)]) == 1
    assert "--lpips" in capsys.readouterr().err
    # a folder holding a `fastdiff train` run is not an autoencoder run to resume
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "checkpoint.json").write_text(json.dumps({"format": "fastdiff-checkpoint-1"}))
    assert main(BASE + ["--out", str(tmp_path / "c"), "--resume"]) == 1
    assert "not an autoencoder run's checkpoint" in capsys.readouterr().err
    assert main(BASE + ["--out", str(tmp_path / "c")]) == 2  # a run there, and neither --resume nor --overwrite
    assert "--overwrite" in capsys.readouterr().err
