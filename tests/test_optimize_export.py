"""Compile costs in the command line: `--fast auto` decides from the work and says why, and an
ahead-of-time compiled package (`fastdiff export --compiled`) runs as the model does.

The package's runner is AOTInductor's generated code; here a stand-in runner (the model itself)
checks everything around it — cutting and padding batches to the package's size, the
attributes that sampling reads, the command-line checks. The real AOTInductor round trip is
tests/test_optimize_export.py::test_aot_package_round_trip (minutes of C++ compilation: run
with FASTDIFF_AOT_TEST=1; bench/compile_cost.py measures it for the CIFAR-10 U-Net)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.cli import main
from fastdiff.cli.fast import decide, forward_passes
from fastdiff.interop.compiled import CompiledPackageModel

MODEL = str(Path(__file__).parent / "data" / "shapes16-cfg.safetensors")


def test_fast_auto_compiles_only_when_the_passes_pay_for_it():
    go, why = decide(passes=10, eager_seconds=0.5, compile_seconds=100.0)
    assert not go and "10 forward passes" in why and "not worth it" in why
    go, why = decide(passes=5000, eager_seconds=0.5, compile_seconds=100.0)
    assert go and why.endswith("compiling")

    class A:
        steps, batch_size, sampler = 50, 64, "ddim"
    assert forward_passes(A, 1000) == 50 * 16
    A.sampler = "heun"
    assert forward_passes(A, 64) == 100


def test_cli_fast_auto_on_a_small_job_says_why_and_runs_eager(tmp_path, capsys):
    torch.set_num_threads(1)  # restored by conftest
    common = ["sample", MODEL, "--n", "2", "--steps", "2", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    capsys.readouterr()
    assert main([*common, "--fast", "--out", str(tmp_path / "auto.png")]) == 0
    printed = capsys.readouterr().out
    assert "--fast auto: 2 forward passes at ~" in printed and "not worth it, running eager" in printed
    plain, auto = (np.load(tmp_path / f"{k}.npz")["images"] for k in ("plain", "auto"))
    assert np.array_equal(plain, auto)  # eager: the plain path's images, bit for bit


def _stand_in_package(model, batch_size):
    calls = []

    def runner(x, t, y):  # what AOTInductor's runner is called with: one fixed batch
        calls.append(x.shape[0])
        with torch.no_grad():
            return model(x, t, y=y).float()

    meta = {"batch_size": str(batch_size), "sample_shape": json.dumps(list(model.sample_shape)),
            "num_classes": json.dumps(model.num_classes), "default_guidance_scale": repr(model.default_guidance_scale),
            "precision": "fp32", "ops": "fused"}
    return CompiledPackageModel(runner, meta, model.diffusion, Path("unet.pt2"), 0.0), calls


def test_package_model_cuts_and_pads_batches_and_samples_like_the_model():
    torch.set_num_threads(1)
    model, _ = fastdiff.load_model(MODEL)
    package, calls = _stand_in_package(model, batch_size=3)
    assert package.num_classes == model.num_classes and package.sample_shape == model.sample_shape
    assert package.diffusion is model.diffusion
    y = torch.arange(4) % model.num_classes
    kw = dict(n=4, steps=3, seed=2, y=y)
    ref = fastdiff.sample(model, **kw)
    out = fastdiff.sample(package, **kw)
    # guided: 8 rows per call, cut as 3 + 3 + 2 (padded to 3) per step
    assert set(calls) == {3} and len(calls) == 3 * 3
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # other batch sizes: float rounding only
    with pytest.raises(ValueError, match="needs class labels y"):
        package(torch.zeros(1, *model.sample_shape), torch.zeros(1, dtype=torch.long))
    with pytest.raises(TypeError, match="extra arguments"):
        package(torch.zeros(1, *model.sample_shape), torch.zeros(1, dtype=torch.long), y=y[:1], scale=2.0)


def test_export_compiled_checks_its_options_before_compiling(tmp_path, capsys):
    code = main(["export", MODEL, "--compiled", "--out", str(tmp_path / "m.safetensors")])
    assert code == 2 and "--out must end in .pt2" in capsys.readouterr().err
    code = main(["export", MODEL, "--compiled", "--format", "diffusers", "--out", str(tmp_path / "m.pt2")])
    assert code == 2 and "cannot be combined with --format diffusers" in capsys.readouterr().err
    bogus = tmp_path / "not-a-package.pt2"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(Exception, match="not a loadable AOTInductor package"):
        fastdiff.load_model(bogus)


@pytest.mark.skipif(os.environ.get("FASTDIFF_AOT_TEST") != "1",
                    reason="AOTInductor compiles C++ for minutes on 2 cores: FASTDIFF_AOT_TEST=1 runs it")
@pytest.mark.parametrize("ops", ["fused", "reference"])
def test_aot_package_round_trip(tmp_path, ops):
    """export --compiled, then load_model + sample: the images of the model (float rounding)."""
    out = tmp_path / "m.pt2"
    assert main(["export", MODEL, "--compiled", "--batch-size", "8", "--ops", ops, "--out", str(out)]) == 0
    package, info = fastdiff.load_model(out)
    model, _ = fastdiff.load_model(MODEL)
    assert info["compiled"] and package.meta["ops"] == ops
    y = torch.arange(4) % model.num_classes
    kw = dict(n=4, steps=3, seed=2, y=y)
    torch.testing.assert_close(fastdiff.sample(package, **kw), fastdiff.sample(model, **kw), rtol=1e-4, atol=1e-4)
