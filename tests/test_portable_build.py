"""The portable build (FASTDIFF_NATIVE=OFF: no -march=native, so csrc/cpu/philox.h takes its
scalar path instead of AVX-512 intrinsics) builds and its kernels match the references.

CMake builds fastdiff._C into a temp dir; a subprocess loads that module as fastdiff._C and
runs each CPU kernel against its pure-torch reference (and the noise stream bit for bit
against the reference generator's float64 values rounded to fp32)."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r'''
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("fastdiff._C", sys.argv[1])
lib = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lib)
sys.modules["fastdiff._C"] = lib
import fastdiff
from fastdiff import ops
from fastdiff.ops import _backend
assert _backend.native_lib is lib, "the portable module is not the one in use"
gen = torch.Generator().manual_seed(0)
x = torch.randn(3, 4, 9, 7, generator=gen)
out = torch.randn(3, 4, 9, 7, generator=gen)
coefs = ops.StepCoefficients(1.2, -0.5, 0.4, 0.7, 0.3)
with ops.use_backend("native"):
    assert ops.backend_for("sampler_step", x) == "native"
    got = ops.sampler_step(x, out, coefs, seed=2**35 + 9, step=3, sample_offset=1, clip_denoised=True)
    z = ops.randn((3, 1001), seed=77, step=5)
    w, b = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    y = ops.group_norm_silu(x, 2, w, b)
    q, k, v = (torch.randn(2, 2, 33, 40, generator=gen) for _ in range(3))
    a = ops.attention(q, k, v)
with ops.use_backend("reference"):
    want = ops.sampler_step(x, out, coefs, seed=2**35 + 9, step=3, sample_offset=1, clip_denoised=True)
    y_ref = ops.group_norm_silu(x.double(), 2, w.double(), b.double())
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
z_ref = ops.philox_normal_reference(3, 1001, seed=77, step=5)
torch.testing.assert_close(z.double(), z_ref, rtol=2e-6, atol=2e-6)
torch.testing.assert_close(a.double(), ops.attention_reference(q.double(), k.double(), v.double())[0],
                           rtol=1e-4, atol=1e-5)
print("portable ok")
'''


@pytest.mark.slow
def test_portable_build_matches_the_references(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("needs cmake and a C++ compiler")
    pybind11 = pytest.importorskip("pybind11")
    build = tmp_path / "build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build), "-DFASTDIFF_NATIVE=OFF", "-DFASTDIFF_CUDA=OFF",
                 "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
                 f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, [cmake, "--build", str(build), "--target", "_C", "-j", "2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    commands = json.loads((build / "compile_commands.json").read_text())
    kernel_commands = [c["command"] for c in commands if "/csrc/cpu/" in c["file"]]
    assert kernel_commands and not any("-march=native" in c for c in kernel_commands)
    module = build / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    assert module.exists(), sorted(p.name for p in build.iterdir())
    env = dict(os.environ, OMP_NUM_THREADS="2")
    run = subprocess.run([sys.executable, "-c", CHECK, str(module)], capture_output=True, text=True, timeout=600,
                         env=env, cwd=str(tmp_path))  # the installed package, not the source tree
    assert run.returncode == 0 and "portable ok" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]
