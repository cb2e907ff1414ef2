"""Exported model files (fastdiff.interop.export_model / load_model, `fastdiff export`) and the
default classifier-free guidance scale a trained class-conditional model carries."""
import json

import pytest
import torch
from safetensors import safe_open

import fastdiff
from fastdiff.cli import main
from fastdiff.interop import export_model, load_model
from fastdiff.train import DEFAULT_GUIDANCE_SCALE, TrainConfig, load_checkpoint, train

FAST = dict(data="shapes", dataset_size=16, batch_size=4, preset="tiny", progress=False, sample_at_end=False,
            T=20, warmup_steps=1, image_size=16, steps=2, sample_steps=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    train(TrainConfig(out=str(root / "cond"), class_cond=True, **FAST))
    train(TrainConfig(out=str(root / "cond-w1.5"), class_cond=True, guidance_scale=1.5, **FAST))
    train(TrainConfig(out=str(root / "learned"), loss="hybrid", **FAST))
    return root


def _outputs(model, y=None):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=gen)
    t = torch.tensor([0, 7, 19])
    with torch.no_grad():
        return model(x, t, y=y) if y is not None else model(x, t)


@pytest.mark.parametrize("run", ["cond", "learned"])
def test_fp32_export_round_trips_exactly(runs, run, tmp_path):
    path = export_model(runs / run, tmp_path / "m.safetensors")
    ref, record = load_checkpoint(runs / run)
    got, info = load_model(path)
    assert info["step"] == record["step"] == 2 and info["weights"] == "ema"
    assert got.config == ref.config
    assert got.diffusion.T == ref.diffusion.T and got.diffusion.variance == ref.diffusion.variance
    assert torch.equal(got.diffusion.schedule.betas, ref.diffusion.schedule.betas)
    for (ka, a), (kb, b) in zip(got.state_dict().items(), ref.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka
    y = torch.tensor([0, 3, 10]) if ref.num_classes else None
    assert torch.equal(_outputs(got, y), _outputs(ref, y))


def test_half_precision_export_is_smaller_and_close(runs, tmp_path):
    full = export_model(runs / "cond", tmp_path / "fp32.safetensors")
    half = export_model(runs / "cond", tmp_path / "fp16.safetensors", dtype="fp16")
    assert half.stat().st_size < 0.6 * full.stat().st_size
    with safe_open(str(half), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype in (torch.float16, torch.int64)
        assert json.loads(f.metadata()["model_config"])["num_classes"] == 10
    a, _ = load_model(full)
    b, _ = load_model(half)
    assert all(p.dtype == torch.float32 for p in b.parameters())  # loaded back as fp32
    y = torch.tensor([1, 2, 10])
    torch.testing.assert_close(_outputs(b, y), _outputs(a, y), rtol=2e-2, atol=2e-2)


def test_load_model_reads_a_run_folder_too(runs):
    model, info = fastdiff.load_model(runs / "cond")  # the top-level name is fastdiff.interop.load_model
    assert info["step"] == 2 and model.default_guidance_scale == DEFAULT_GUIDANCE_SCALE


def test_bad_model_files_are_clear_errors(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model file"):
        load_model(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors model file"):
        load_model(junk)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a fastdiff model file"):
        load_model(other)
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_model(runs / "cond", tmp_path / "x.safetensors", dtype="int8")


def test_default_guidance_scale_rules():
    assert TrainConfig(class_cond=True).resolved_guidance_scale == DEFAULT_GUIDANCE_SCALE
    assert TrainConfig(class_cond=True, guidance_scale=0.5).resolved_guidance_scale == 0.5
    # no unconditional branch was trained: guidance would extrapolate from an untrained row
    assert TrainConfig(class_cond=True, p_uncond=0.0, guidance_scale=2.0).resolved_guidance_scale == 0.0
    assert TrainConfig(class_cond=False).resolved_guidance_scale == 0.0
    with pytest.raises(ValueError, match="guidance_scale must be None or a finite number >= 0, got -1"):
        TrainConfig(guidance_scale=-1.0).validate()


def test_resume_keeps_a_recorded_scale_unless_told(runs, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(runs / "cond-w1.5", run)
    train(TrainConfig(out=str(run), class_cond=True, resume=True, **{**FAST, "steps": 3}))
    assert load_checkpoint(run)[0].default_guidance_scale == 1.5
    train(TrainConfig(out=str(run), class_cond=True, resume=True, guidance_scale=0.5, **{**FAST, "steps": 4}))
    assert load_checkpoint(run)[0].default_guidance_scale == 0.5


def test_sample_uses_the_models_default_scale(runs, tmp_path):
    """guidance_scale=None means the model's recorded w; an explicit w overrides it; an
    exported file carries the same default."""
    model, _ = load_checkpoint(runs / "cond-w1.5")
    assert model.default_guidance_scale == 1.5
    exported, _ = load_model(export_model(runs / "cond-w1.5", tmp_path / "m.safetensors"))
    assert exported.default_guidance_scale == 1.5
    y = torch.arange(4) % 10
    kw = dict(n=4, steps=5, seed=1, y=y)
    default = fastdiff.sample(model, **kw)
    assert torch.equal(default, fastdiff.sample(model, guidance_scale=1.5, **kw))
    assert torch.equal(default, fastdiff.sample(exported, **kw))
    assert not torch.equal(default, fastdiff.sample(model, guidance_scale=0.0, **kw))
    # without labels there is nothing to guide toward: the default does not apply
    fastdiff.sample(model, n=2, steps=3)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0, got 'big'"):
        fastdiff.sample(model, guidance_scale="big", **kw)


def test_export_and_sample_from_the_cli(runs, tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    assert main(["export", str(runs / "cond"), "--out", str(path), "--dtype", "bf16"]) == 0
    assert "exported EMA weights" in capsys.readouterr().out
    out = tmp_path / "grid.png"
    assert main(["sample", str(path), "--per-class", "2", "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"guidance scale {DEFAULT_GUIDANCE_SCALE:g}" in printed and "20 samples" in printed
    import numpy as np
    from PIL import Image
    saved = np.load(out.with_suffix(".npz"))
    assert saved["labels"].tolist() == [k for k in range(10) for _ in range(2)]  # row k: class k
    width, height = Image.open(out).size
    assert height > 4 * width  # 10 rows of 2
    assert main(["sample", str(path), "--no-ema", "--out", str(out), "--no-progress"]) == 2
    assert "--no-ema needs a run folder" in capsys.readouterr().err
    assert main(["sample", str(path), "--per-class", "2", "--class", "1", "--steps", "3", "--out", str(out),
                 "--no-progress"]) == 2
    assert "cannot be combined with --class" in capsys.readouterr().err
    assert main(["sample", str(runs / "learned"), "--per-class", "2", "--steps", "3", "--out", str(out),
                 "--no-progress"]) == 2
    assert "--per-class needs a class-conditional model" in capsys.readouterr().err
