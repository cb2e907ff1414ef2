"""Hardening (issue #12): nothing silently wrong, nothing lost, no unbounded work from a small
file. One test (or a few) per case; each fails without its fix."""
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastdiff
from fastdiff.cli import main
from fastdiff.data import DatasetError, load_dataset, load_npz
from fastdiff.diffusion import GaussianDiffusion
from fastdiff.errors import InputError, UserError
from fastdiff.interop import export_model, load_model
from fastdiff.io import RunFolderLocked, RunLock
from fastdiff.models.unet import UNet
from fastdiff.schedule import NoiseSchedule
from fastdiff.train import CHECKPOINT_JSON, TrainConfig, load_checkpoint, read_checkpoint_record, train

FAST = dict(data="shapes", dataset_size=8, batch_size=2, preset="tiny", progress=False, sample_at_end=False,
            T=20, warmup_steps=1, image_size=16, sample_steps=2, sample_n=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained run folder (2 steps) and its export; tests copy them before changing anything."""
    root = tmp_path_factory.mktemp("hardening")
    train(TrainConfig(out=str(root / "run"), steps=2, **FAST))
    export_model(root / "run", root / "model.safetensors")
    return root


def _copy_run(run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run / "run", dst)
    return dst


def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# --------------------------------------------------------------------------- 1. one writer
def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    out = tmp_path / "run"
    with RunLock(out, what="test writer"):
        with pytest.raises(RunFolderLocked, match="in use by test writer .* one writer at a time"):
            RunLock(out).acquire()
        with pytest.raises(UserError, match="one writer"):
            train(TrainConfig(out=str(out), steps=1, **FAST))
    assert not (out / CHECKPOINT_JSON).exists()  # the refused writer wrote nothing
    train(TrainConfig(out=str(out), steps=1, **FAST))  # released: the folder is free again
    RunLock(out).acquire().release()  # and train released it at its end


def test_second_writer_from_the_cli_is_a_clean_error(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out):
        code, err = _cli(["train", "--data", "shapes", "--out", out, "--steps", "1", "--no-progress"], capsys)
    assert code == 2 and "one writer" in err


def test_startup_cleans_only_the_runs_own_temp_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    own = [out / ".checkpoint.json.abc123.tmp", out / ".ckpt-00000001.safetensors.x1.tmp",
           out / ".log.jsonl.zz.tmp"]
    foreign = [out / ".notes.txt.abc.tmp", out / ".model.safetensors.q.tmp"]
    for f in own + foreign:
        f.write_bytes(b"x")
    train(TrainConfig(out=str(out), steps=1, **FAST))
    assert not any(f.exists() for f in own)
    assert all(f.exists() for f in foreign)


# --------------------------------------------------------------------------- 2. divergence
def _lr_from(monkeypatch, step, value):
    import fastdiff.train.loop as loop
    real = loop.lr_at
    monkeypatch.setattr(loop, "lr_at", lambda config, s: real(config, s) if s < step else value)


@pytest.mark.parametrize("lr", [1e30, 10.0], ids=["lr-1e30", "lr-10"])
def test_divergence_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, lr):
    # steps 0-3 at a sane lr, checkpoint at step 4, then the lr jumps: the run must stop
    # (finite blow-ups too) and keep the step-4 record and weights, not save diverged ones.
    _lr_from(monkeypatch, 4, lr)
    out = tmp_path / "run"
    r = train(TrainConfig(out=str(out), steps=40, save_every=4, max_nonfinite=3, **FAST))
    assert r.status == "nonfinite", r
    assert "last good checkpoint (step 4)" in r.message
    record = read_checkpoint_record(out)
    assert record["step"] == 4
    weights = load_file(str(out / record["weights"]))
    assert all(torch.isfinite(v).all() and v.abs().max() < 100 for k, v in weights.items()
               if k.startswith("model."))


def test_finite_blow_up_is_detected_from_the_loss(tmp_path, monkeypatch, capsys):
    _lr_from(monkeypatch, 4, 10.0)
    r = train(TrainConfig(out=str(tmp_path / "run"), steps=40, save_every=4, max_nonfinite=3, **FAST))
    err = capsys.readouterr().err
    assert r.status == "nonfinite" and r.step < 40
    assert "exploding loss" in err or "non-finite" in err


def test_code_cli_exit_status_for_a_diverged_run(tmp_path, monkeypatch, capsys):
    _lr_from(monkeypatch, 2, 1e30)
    code, err = _cli(["train", "--data", "shapes", "--dataset-size", "8", "--batch-size", "2", "--T", "20",
                      "--image-size", "16", "--steps", "30", "--save-every", "2", "--max-nonfinite", "2",
                      "--sample-steps", "2", "--no-progress", "--out", tmp_path / "run"], capsys)
    assert code == 1 and "last good checkpoint (step 2)" in err


# --------------------------------------------------------------------------- 3. no silent overwrite
def test_train_over_an_existing_run_needs_resume_or_overwrite(run, tmp_path, capsys):
    out = _copy_run(run, tmp_path)
    before = (out / CHECKPOINT_JSON).read_bytes()
    with pytest.raises(UserError, match="--resume continues it, --overwrite"):
        train(TrainConfig(out=str(out), steps=1, **FAST))
    assert (out / CHECKPOINT_JSON).read_bytes() == before
    code, err = _cli(["train", "--data", "shapes", "--out", out, "--steps", "1", "--no-progress"], capsys)
    assert code == 2 and "--overwrite" in err
    assert (out / CHECKPOINT_JSON).read_bytes() == before
    r = train(TrainConfig(out=str(out), steps=1, overwrite=True, **FAST))
    assert r.step == 1 and read_checkpoint_record(out)["step"] == 1
    with pytest.raises(ValueError, match="resume and overwrite"):
        TrainConfig(out=str(out), steps=1, resume=True, overwrite=True).validate()


@pytest.mark.parametrize("name", [CHECKPOINT_JSON, "WEIGHTS", "log.jsonl"])
def test_export_never_writes_over_the_runs_own_files(run, tmp_path, capsys, name):
    out = _copy_run(run, tmp_path)
    if name == "WEIGHTS":
        name = read_checkpoint_record(out)["weights"]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="file of the training run"):
        export_model(out, out / name)
    code, err = _cli(["export", out, "--out", out / name], capsys)
    assert code == 2 and "file of the training run" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    load_checkpoint(out)


# --------------------------------------------------------------------------- 4. sizes from files
def test_huge_labels_in_a_small_npz_are_refused(tmp_path):
    path = tmp_path / "labels.npz"
    np.savez(path, x=np.zeros((8, 8, 8, 3), np.uint8), y=np.array([0, 1, 2, 3, 4, 5, 6, 2_000_000_000]))
    with pytest.raises(DatasetError, match="label 2000000000 is too large"):
        load_npz(path, 8)


def _npz_claiming(path, shape, payload=b""):
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", buf.getvalue() + payload)


def test_npz_headers_are_checked_before_anything_is_read(tmp_path, monkeypatch):
    big = tmp_path / "big.npz"
    _npz_claiming(big, (10 ** 6, 3, 256, 256))  # 196 GB claimed, a few hundred bytes stored
    with pytest.raises(DatasetError, match="would take .* GiB"):
        load_npz(big, 32)
    lying = tmp_path / "lying.npz"
    _npz_claiming(lying, (8, 3, 32, 32), payload=b"\0" * 100)
    with pytest.raises(DatasetError, match="claims shape"):
        load_npz(lying, 32)
    # a real compressed file that decodes beyond the limit: refused from its header
    import fastdiff.data as data
    small = tmp_path / "zeros.npz"
    np.savez_compressed(small, x=np.zeros((64, 3, 32, 32), np.uint8))
    monkeypatch.setattr(data, "MAX_DATA_BYTES", 100_000)
    assert small.stat().st_size < 10_000
    with pytest.raises(DatasetError, match="would take"):
        load_npz(small, 32)


def test_shapes_size_is_bounded_before_allocating():
    with pytest.raises(DatasetError, match="would take"):
        load_dataset("shapes", image_size=1024, n=10 ** 6)


def _rewrite_export(src, dst, **changes):
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, change in changes.items():
        if change is None:
            meta.pop(key)
        else:
            meta[key] = change(meta[key]) if callable(change) else change
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _json_edit(**kv):
    def edit(text):
        d = json.loads(text)
        for k, v in kv.items():
            if v is None:
                d.pop(k)
            else:
                d[k] = v
        return json.dumps(d)
    return edit


@pytest.mark.parametrize("changes, needle", [
    (dict(model_config=_json_edit(model_channels=4096)), "model_channels"),
    (dict(model_config=_json_edit(channel_mult=[1] * 40)), "channel_mult"),
    (dict(config=_json_edit(T=10 ** 9)), "T must be at most"),
    (dict(model_config=_json_edit(model_channels=32)), "do not fit"),  # within bounds, wrong for the file
], ids=["channels-4096", "levels-40", "T-1e9", "shape-mismatch"])
def test_export_sizes_are_checked_before_allocating(run, tmp_path, changes, needle):
    bad = _rewrite_export(run / "model.safetensors", tmp_path / "bad.safetensors", **changes)
    with pytest.raises(InputError, match=needle):
        load_model(bad)


# --------------------------------------------------------------------------- 5. weights name
@pytest.mark.parametrize("weights", ["../elsewhere.safetensors", "/etc/passwd", "sub/ckpt-00000002.safetensors",
                                     "checkpoint.json", "", 7])
def test_checkpoint_weights_must_be_a_plain_name_in_the_folder(run, tmp_path, weights, capsys):
    out = _copy_run(run, tmp_path)
    record = json.loads((out / CHECKPOINT_JSON).read_text())
    record["weights"] = weights
    (out / CHECKPOINT_JSON).write_text(json.dumps(record))
    with pytest.raises(InputError, match="'weights'"):
        load_checkpoint(out)
    code, err = _cli(["sample", out, "--n", "1", "--steps", "1", "--out", tmp_path / "s.png"], capsys)
    assert code == 1 and "'weights'" in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_checkpoint_weights_must_be_a_regular_file(run, tmp_path, capsys):
    out = _copy_run(run, tmp_path)
    record = json.loads((out / CHECKPOINT_JSON).read_text())
    os.mkfifo(out / "ckpt-00000099.safetensors")  # reading it would block forever
    record["weights"] = "ckpt-00000099.safetensors"
    (out / CHECKPOINT_JSON).write_text(json.dumps(record))
    code, err = _cli(["sample", out, "--n", "1", "--steps", "1", "--out", tmp_path / "s.png"], capsys)
    assert code == 1 and "not a regular file" in err
    os.unlink(out / "ckpt-00000099.safetensors")
    os.symlink(run / "run" / read_checkpoint_record(run / "run")["weights"], out / "ckpt-00000099.safetensors")
    with pytest.raises(InputError, match="not a regular file"):
        load_checkpoint(out)


# --------------------------------------------------------------------------- 6. one schema
@pytest.mark.parametrize("edit, needle", [
    (lambda r: r["config"].pop("T"), "lacks T"),
    (lambda r: r["config"].update(T="50"), "'T' must be of type"),
    (lambda r: r["config"].update(preset="huge"), "preset must be one of"),
    (lambda r: r["model_config"].pop("num_groups"), "lacks num_groups"),
    (lambda r: r["model_config"].update(dropout="x"), "dropout"),
    (lambda r: r.pop("step"), "'step'"),
    (lambda r: r.update(step=-3), "'step'"),
    (lambda r: r.update(config=[1, 2]), "'config'"),
    (lambda r: r.update(nonfinite_skipped="many"), "nonfinite_skipped"),
], ids=["no-T", "T-str", "preset", "no-num_groups", "dropout-str", "no-step", "step-neg", "config-list",
        "nonfinite-str"])
def test_tampered_checkpoint_records_are_one_clear_error(run, tmp_path, capsys, edit, needle):
    out = _copy_run(run, tmp_path)
    record = json.loads((out / CHECKPOINT_JSON).read_text())
    edit(record)
    (out / CHECKPOINT_JSON).write_text(json.dumps(record))
    with pytest.raises(InputError, match=needle):
        load_checkpoint(out)
    code, err = _cli(["sample", out, "--n", "1", "--steps", "1", "--out", tmp_path / "s.png"], capsys)
    assert code == 1 and needle.strip("'") in err
    code, err = _cli(["train", "--data", "shapes", "--out", out, "--steps", "3", "--resume", "--no-progress"],
                     capsys)
    assert code == 1 and needle.strip("'") in err


@pytest.mark.parametrize("changes, needle", [
    (dict(config=_json_edit(T=None)), "lacks T"),
    (dict(config=_json_edit(preset="nope")), "preset must be one of"),
    (dict(config=None), "missing config"),
    (dict(model_config=_json_edit(num_classes="ten")), "num_classes"),
    (dict(default_guidance_scale="nan"), "default_guidance_scale"),
    (dict(step="two"), "'step'"),
    (dict(config="{not json"), "config"),
], ids=["no-T", "preset", "no-config", "num_classes-str", "guidance-nan", "step-str", "config-not-json"])
def test_tampered_export_metadata_is_one_clear_error(run, tmp_path, capsys, changes, needle):
    bad = _rewrite_export(run / "model.safetensors", tmp_path / "bad.safetensors", **changes)
    with pytest.raises(InputError, match=needle):
        load_model(bad)
    code, err = _cli(["sample", bad, "--n", "1", "--steps", "1", "--out", tmp_path / "s.png"], capsys)
    assert code == 1 and "invalid fastdiff model metadata" in err


def test_a_truncated_log_line_or_edited_log_does_not_break_resume(run, tmp_path):
    out = _copy_run(run, tmp_path)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": "x", "loss": 1}\n[1, 2]\n{"step": 1}\n{"step": 0, "loss": NaN}\n{"ste')
    r = train(TrainConfig(out=str(out), steps=3, resume=True, **FAST))
    assert r.step == 3 and all(np.isfinite(l) for _, l in r.losses)


# --------------------------------------------------------------------------- 9. silently wrong
def test_a_beta_of_one_or_max_beta_above_one_is_refused():
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\).*betas\[2\] = 1.0"):
        NoiseSchedule([0.1, 0.2, 1.0])
    with pytest.raises(ValueError, match="max_beta"):
        NoiseSchedule.cosine(10, max_beta=1.5)
    with pytest.raises(ValueError, match="max_beta"):
        NoiseSchedule.cosine(10, max_beta=1.0)
    with pytest.raises(ValueError, match="beta_end"):
        NoiseSchedule.linear(1000, beta_end=1.0)


def _nan_model():
    model = UNet.preset("tiny", image_size=16, diffusion=GaussianDiffusion(NoiseSchedule.linear(20))).eval()
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    return model


def test_a_nan_model_writes_no_image_and_exits_1(tmp_path, monkeypatch, capsys):
    import fastdiff.cli.sample as cli_sample
    monkeypatch.setattr(cli_sample, "load_for_sampling", lambda source, no_ema=False: (_nan_model(), "test"))
    out = tmp_path / "s.png"
    code, err = _cli(["sample", "anything", "--n", "2", "--steps", "2", "--out", out, "--no-progress"], capsys)
    assert code == 1 and "2 of 2 samples hold NaN or inf" in err
    assert not out.exists() and not out.with_suffix(".npz").exists()


def test_image_grids_refuse_non_finite_images(tmp_path):
    from fastdiff.image_utils import NonFiniteImagesError, save_image_grid
    x = torch.zeros(3, 3, 4, 4)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteImagesError, match="1 of 3 images"):
        save_image_grid(x, tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int32])
def test_integer_or_bool_model_outputs_are_an_error(dtype):
    d = GaussianDiffusion(NoiseSchedule.linear(10))
    x = torch.zeros(2, 3, 4, 4)
    t = torch.tensor([1, 2])

    def model(x_t, tt):
        return torch.zeros(x_t.shape, dtype=dtype)
    with pytest.raises(TypeError, match=f"model returned a {dtype}"):
        d.p_mean_variance(model, x, t)
    with pytest.raises(TypeError, match=f"model returned a {dtype}"):
        d.training_losses(model, x, t=t)
    with pytest.raises(TypeError, match=f"model returned a {dtype}"):  # and fastdiff.sample's loop
        fastdiff.sample(lambda x_t, tt, **kw: torch.zeros(x_t.shape, dtype=dtype), steps=2, diffusion=d,
                        x_T=torch.randn(1, 3, 4, 4))


# --------------------------------------------------------------------------- 10. outputs first
def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "adir.png").mkdir()
    missing_run = tmp_path / "no-run"  # the --out error must come first: nothing was loaded
    cases = [
        (["sample", missing_run, "--out", afile / "s.png"], "is not a folder"),
        (["export", missing_run, "--out", afile / "m.safetensors"], "is not a folder"),
        (["export", missing_run, "--out", tmp_path], "is a folder"),
        (["eval", "bpd", missing_run, "--data", "shapes", "--json", afile / "r.json"], "is not a folder"),
        (["train", "--data", "shapes", "--out", afile / "run", "--steps", "1"], "is not a folder"),
        (["train", "--data", "shapes", "--out", afile, "--steps", "1"], "not a folder"),
        (["train-classifier", "--data", "shapes", "--out", afile / "c", "--steps", "1"], "is not a folder"),
        (["train-features", "--out", afile / "f", "--steps", "1"], "is not a folder"),
        (["demo", "--out", afile / "d", "--minutes", "0.01"], "is not a folder"),
    ]
    for argv, needle in cases:
        code, err = _cli(argv, capsys)
        assert code == 2 and needle in err and ("--out" in err or "--json" in err), (argv, err)


@pytest.mark.parametrize("argv", [
    ["train", "--data", "shapes", "--out", "OUT", "--steps", "1", "--image-size", "20000"],
    ["train-features", "--out", "OUT", "--image-size", "20000"],
    ["demo", "--out", "OUT", "--image-size", "20000"],
], ids=["train", "train-features", "demo"])
def test_absurd_image_sizes_are_usage_errors(tmp_path, capsys, argv):
    code, err = _cli([str(tmp_path / "o") if a == "OUT" else a for a in argv], capsys)
    assert code == 2 and "at most 1024" in err
    assert not (tmp_path / "o").exists()


def test_absurd_sample_counts_are_usage_errors(run, tmp_path, capsys):
    code, err = _cli(["sample", run / "run", "--n", "100000000", "--out", tmp_path / "s.png"], capsys)
    assert code == 2 and "--n 100000000" in err
    code, err = _cli(["sample", run / "run", "--n", "4", "--scale", "100000", "--out", tmp_path / "s.png"], capsys)
    assert code == 2 and "--scale" in err


# --------------------------------------------------------------------------- 11. API errors
def test_training_losses_names_bad_images():
    d = GaussianDiffusion(NoiseSchedule.linear(10))

    def model(x, t):
        return torch.zeros_like(x)
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor.*torch.uint8"):
        d.training_losses(model, torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"x0 must be a non-empty batch.*\(0, 3, 4, 4\)"):
        d.training_losses(model, torch.zeros(0, 3, 4, 4))
    with pytest.raises(ValueError, match="noise must be"):
        d.training_losses(model, torch.zeros(2, 3, 4, 4), noise=torch.zeros(2, 3, 4, 5))
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor"):
        d.nll_bpd(model, torch.zeros(2, 3, 4, 4, dtype=torch.long))
