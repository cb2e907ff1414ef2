"""Training: exact resume, crash-safe checkpoints, non-finite losses, every loss and
t-sampler, DDP on two CPU processes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastdiff.io import atomic_write_bytes
from fastdiff.train import CHECKPOINT_JSON, TrainConfig, load_checkpoint, read_checkpoint_record, train
from fastdiff.train.ema import ema_update

# Small enough for 2 shared CPU cores: the tiny preset on 16 shapes, batch 4.
FAST = dict(data="shapes", dataset_size=16, batch_size=4, preset="tiny", progress=False, sample_steps=2,
            sample_n=2, T=50, warmup_steps=3)
# Subprocesses use this process's thread count: bitwise equality holds for equal thread
# counts (a reduction split over a different number of threads rounds differently).
# They import the installed fastdiff, run from tmp_path: the source tree's fastdiff/ has no
# compiled core when the package was built by `pip install .`.
ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _weights(out) -> dict:
    record = read_checkpoint_record(out)
    return load_file(str(Path(out) / record["weights"]))


def _assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_bitwise_exact(tmp_path):
    # N steps in one run == N/2 steps, then --resume for the rest: model, EMA, optimizer and
    # importance sampler state all identical (T=2 so that Eq. 103's sampler warms up by the end).
    cfg = dict(FAST, T=2, sample_steps=2, loss="hybrid", t_sampler="importance", dropout=0.1, batch_size=8,
               dataset_size=12, save_every=2, sample_at_end=False)
    full = train(TrainConfig(out=str(tmp_path / "full"), steps=4, **cfg))
    train(TrainConfig(out=str(tmp_path / "half"), steps=2, **cfg))
    resumed = train(TrainConfig(out=str(tmp_path / "half"), steps=4, resume=True, **cfg))
    assert resumed.step == 4
    _assert_bitwise_equal(_weights(tmp_path / "full"), _weights(tmp_path / "half"))
    a, b = read_checkpoint_record(tmp_path / "full"), read_checkpoint_record(tmp_path / "half")
    assert a["t_sampler"] == b["t_sampler"] and a["data"] == b["data"]
    assert np.array(a["t_sampler"]["state"]["counts"]).min() == 10  # the importance sampler was in use
    # the resumed run's loss log is the uninterrupted one's
    assert [s for s, _ in resumed.losses] == list(range(4))
    np.testing.assert_array_equal([l for _, l in resumed.losses], [l for _, l in full.losses])


def test_checkpoint_contents(tmp_path):
    r = train(TrainConfig(out=str(tmp_path), steps=2, **FAST))
    record = read_checkpoint_record(tmp_path)
    assert record["step"] == 2 and record["config"]["steps"] == 2
    assert set(record["rng"]) >= {"torch", "numpy", "python"}
    assert record["data"]["position"] == 2 * FAST["batch_size"]
    w = _weights(tmp_path)
    assert any(k.startswith("model.") for k in w) and any(k.startswith("ema.") for k in w)
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in w)
    assert (tmp_path / "loss.png").exists() and (tmp_path / "samples" / "step-00000002.png").exists()
    model, _ = load_checkpoint(tmp_path)
    assert model.diffusion.T == 50 and not model.training
    assert r.steps_per_s > 0


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    monkeypatch.setenv("FASTDIFF_TEST_SAVE_HOOK", "raise")
    monkeypatch.setenv("FASTDIFF_TEST_SAVE_HOOK_MATCH", "f.bin@")
    with pytest.raises(RuntimeError, match="simulated"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind


TRAIN_SCRIPT = """
import sys, json
from fastdiff.train import TrainConfig, train
cfg = TrainConfig(**json.loads(sys.argv[1]))
train(cfg)
"""


@pytest.mark.parametrize("match", ["ckpt-00000002.safetensors@2", "checkpoint.json@2"], ids=["weights", "record"])
def test_kill_during_save_leaves_last_checkpoint_and_resume_is_exact(tmp_path, match):
    # SIGKILL a training process while it saves step 2 (temp file written, rename pending):
    # the step-1 checkpoint must load, and resuming from it must equal an uninterrupted run.
    out = tmp_path / "run"
    cfg = dict(FAST, out=str(out), steps=3, save_every=1, batch_size=2, sample_at_end=False)
    err = open(tmp_path / "stderr.txt", "w")
    env = dict(ENV, FASTDIFF_TEST_SAVE_HOOK="sleep:600", FASTDIFF_TEST_SAVE_HOOK_MATCH=match)
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, json.dumps(cfg)], env=env, stderr=err,
                            stdout=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while "[save hook]" not in (tmp_path / "stderr.txt").read_text():
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.time() < deadline, "the training process never reached the save hook"
            time.sleep(0.2)
        assert any(p.name.endswith(".tmp") for p in out.iterdir())  # killed mid-save
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
    assert read_checkpoint_record(out)["step"] == 1
    model, _ = load_checkpoint(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    train(TrainConfig(**dict(cfg, resume=True)))
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    train(TrainConfig(**dict(cfg, out=str(tmp_path / "ref"))))
    _assert_bitwise_equal(_weights(out), _weights(tmp_path / "ref"))


def _nan_npz(path, nan_index=None):
    x = np.random.default_rng(0).random((8, 3, 32, 32)).astype(np.float32)
    if nan_index is None:
        x[:] = np.nan
    else:
        x[nan_index] = np.nan
    np.savez(path, x=x)
    return str(path)


def test_nonfinite_losses_are_skipped_and_counted(tmp_path):
    data = _nan_npz(tmp_path / "one_nan.npz", nan_index=3)
    r = train(TrainConfig(**dict(FAST, data=data, out=str(tmp_path / "run"), steps=8, batch_size=2,
                                 sample_at_end=False)))
    assert r.status == "done" and 1 <= r.nonfinite_skipped < 8
    assert len(r.losses) == 8 - r.nonfinite_skipped and all(np.isfinite(l) for _, l in r.losses)
    model, record = load_checkpoint(tmp_path / "run")
    assert record["nonfinite_skipped"] == r.nonfinite_skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_nonfinite_losses_stop_with_a_good_checkpoint(tmp_path, capsys):
    data = _nan_npz(tmp_path / "all_nan.npz")
    r = train(TrainConfig(**dict(FAST, data=data, out=str(tmp_path / "run"), steps=50, max_nonfinite=3,
                                 save_every=3)))
    assert r.status == "nonfinite" and r.step == 4 and r.nonfinite_skipped == 4
    assert "non-finite" in r.message and "max_nonfinite=3" in r.message
    assert "non-finite" in capsys.readouterr().err
    # no step went well, so no checkpoint is good: the one due at step 3 waited, the stop saves
    # nothing (tests/test_hardening.py: a run that diverges keeps its last good checkpoint)
    assert "no checkpoint was saved" in r.message
    assert not (tmp_path / "run" / CHECKPOINT_JSON).exists()


@pytest.mark.parametrize("opts", [
    dict(loss="vlb", t_sampler="importance", schedule="cosine", prediction="v", bf16=True, channels_last=True),
    dict(loss="hybrid", prediction="x0", class_cond=True, variance="learned"),
    dict(loss="simple", schedule="cosine", prediction="v", class_cond=True, sample_every=1),
], ids=["vlb-importance-cosine-v-bf16-cl", "hybrid-x0-learned-classes", "simple-v-classes"])
def test_losses_samplers_and_options_train(tmp_path, opts):
    r = train(TrainConfig(out=str(tmp_path), steps=2, **dict(FAST, **opts)))
    assert r.status == "done" and len(r.losses) == 2 and all(np.isfinite(l) for _, l in r.losses)
    model, record = load_checkpoint(tmp_path)
    assert model.diffusion.loss == opts["loss"] and model.diffusion.prediction == opts["prediction"]
    if opts.get("class_cond"):
        assert model.num_classes == 10
    if opts.get("sample_every"):
        assert (tmp_path / "samples" / "step-00000001.png").exists()


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="l1").validate()
    with pytest.raises(ValueError, match="ema_rate"):
        TrainConfig(ema_rate=1.5).validate()
    with pytest.raises(ValueError, match="class_cond needs a labelled dataset"):
        train(TrainConfig(**dict(FAST, data=_nan_npz_ok(), class_cond=True, steps=1, out="/tmp/never")))


def _nan_npz_ok():
    import tempfile
    path = Path(tempfile.mkdtemp()) / "unlabelled.npz"
    np.savez(path, x=np.zeros((4, 32, 32, 3), np.uint8))
    return str(path)


def test_ema_update_is_a_lerp():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in a.parameters()]
    ema_update(a, b, 0.9)
    for e0, e1, m in zip(before, a.parameters(), b.parameters()):
        torch.testing.assert_close(e1, 0.9 * e0 + 0.1 * m)


def test_ddp_two_cpu_ranks_keep_identical_weights(tmp_path):
    dump = tmp_path / "ranks"
    env = dict(ENV, FASTDIFF_TEST_DUMP_WEIGHTS=str(dump))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastdiff",
           "train", "--data", "shapes", "--dataset-size", "16", "--out", str(tmp_path / "run"), "--steps", "3",
           "--batch-size", "2", "--T", "50", "--sample-steps", "2", "--sample-n", "2", "--dropout", "0.1",
           "--t-sampler", "importance", "--loss", "hybrid", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    _assert_bitwise_equal(r0, r1)
    # and they trained: the weights moved away from the initialisation
    record = read_checkpoint_record(tmp_path / "run")
    assert record["step"] == 3 and record["data"]["world"] == 2
    init = torch.manual_seed(0)  # noqa: F841 - the run's init is seeded with seed 0
    from fastdiff.models.unet import UNet
    torch.manual_seed(0)
    fresh = UNet.preset("tiny", dropout=0.1, learn_sigma=True).state_dict()
    assert any(not torch.equal(r0[f"model.{k}"], v) for k, v in fresh.items())


def test_lr_milestones_multiply_the_rate_after_warmup():
    from fastdiff.train import lr_at
    config = TrainConfig(lr=1e-3, warmup_steps=4, lr_milestones=[10, 20], lr_gamma=0.5).validate()
    assert config.lr_milestones == (10, 20)  # a JSON list comes back as the tuple
    got = [lr_at(config, s) for s in (0, 3, 9, 10, 19, 20, 99)]
    np.testing.assert_allclose(got, [2.5e-4, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])
    for bad, needle in (([0], "lr_milestones must be increasing positive"), ([5, 3], "lr_milestones"),
                        ([2, 2], "lr_milestones")):
        with pytest.raises(ValueError, match=needle):
            TrainConfig(lr_milestones=bad).validate()
    with pytest.raises(ValueError, match="lr_gamma must be in"):
        TrainConfig(lr_gamma=0.0).validate()


def test_a_milestone_run_logs_the_dropped_rate(tmp_path):
    r = train(TrainConfig(out=str(tmp_path), steps=4, lr=1e-3, warmup_steps=0, lr_milestones=(2,), lr_gamma=0.1,
                          log_every=1, sample_at_end=False, **{k: v for k, v in FAST.items() if k != "warmup_steps"}))
    assert r.step == 4
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    rates = {e["step"]: e["lr"] for e in logged if "lr" in e}
    assert rates[0] == rates[1] == pytest.approx(1e-3) and rates[2] == rates[3] == pytest.approx(1e-4)


def test_lr_milestone_given_on_resume_reproduces_one_run(tmp_path):
    """The recipe of tests/data/shapes16-cfg: train, then --resume with a learning-rate drop added.
    It must equal one run with the milestone from the start (it used to be ignored on resume:
    the shipped model's config had been patched by hand to get it)."""
    cfg = dict(FAST, lr=1e-2, save_every=2, sample_at_end=False)
    one = train(TrainConfig(out=str(tmp_path / "one"), steps=4, lr_milestones=(3,), lr_gamma=0.01, **cfg))
    train(TrainConfig(out=str(tmp_path / "two"), steps=2, **cfg))
    two = train(TrainConfig(out=str(tmp_path / "two"), steps=4, resume=True, lr_milestones=(3,), lr_gamma=0.01,
                            **cfg))
    _assert_bitwise_equal(_weights(tmp_path / "one"), _weights(tmp_path / "two"))
    assert read_checkpoint_record(tmp_path / "two")["config"]["lr_milestones"] == [3]
    # and the drop matters: without it the weights differ
    train(TrainConfig(out=str(tmp_path / "none"), steps=4, **cfg))
    assert not torch.equal(_weights(tmp_path / "one")["model.conv_in.weight"],
                           _weights(tmp_path / "none")["model.conv_in.weight"])
    # a resume that does not mention them keeps the recorded milestones
    again = train(TrainConfig(out=str(tmp_path / "two"), steps=5, resume=True, **cfg))
    assert again.step == 5 and read_checkpoint_record(tmp_path / "two")["config"]["lr_milestones"] == [3]
    assert one.step == two.step == 4


def test_a_device_that_is_not_there_is_an_error(tmp_path, monkeypatch):
    """--device cuda:0 without a GPU used to train on the CPU without a word."""
    from fastdiff.cli import main
    from fastdiff.errors import UserError
    from fastdiff.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device(name)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="only 1 CUDA device"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["train", "--data", "shapes", "--out", str(tmp_path / "r"), "--steps", "1", "--device", "cuda:0",
                 "--dataset-size", "8", "--batch-size", "2", "--no-progress"])
    assert code == 2 and not (tmp_path / "r" / CHECKPOINT_JSON).exists()
