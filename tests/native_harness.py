"""Builds a C++ harness around CPU kernel sources with AddressSanitizer + UBSan and runs
it: the bounds checks of tests/test_kernel_bounds.py, test_attention.py and
test_group_norm_silu.py. A harness prints "ok" last when every case ran clean."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def asan_build_and_run(tmp_path, harness_source: str, sources, march: str = "native") -> None:
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None or not os.path.isdir(os.path.join(ROOT, "csrc")):
        pytest.skip("needs a C++ compiler and the source tree")
    src = tmp_path / "harness.cpp"
    src.write_text(harness_source)
    exe = tmp_path / "harness"
    cmd = [cxx, "-std=c++17", "-O1", "-g", f"-march={march}", "-fopenmp", "-fsanitize=address,undefined",
           "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined", f"-I{ROOT}/csrc", str(src),
           *[os.path.join(ROOT, s) for s in sources], "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    if build.returncode != 0 and "sanitize" in build.stderr and "cannot find" in build.stderr:
        pytest.skip("AddressSanitizer runtime not installed")
    assert build.returncode == 0, build.stderr[-3000:]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", OMP_NUM_THREADS="2")
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), (run.stdout[-2000:], run.stderr[-4000:])
