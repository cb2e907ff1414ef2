"""The CPU kernels never read or write out of bounds: C++ harnesses built with
AddressSanitizer call them on odd sizes with exact-size buffers."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "g++"))


def _build_and_run(tmp_path, harness: str, sources, march: str = "native"):
    exe = tmp_path / "harness"
    cmd = [CXX, "-std=c++17", "-O1", "-g", f"-march={march}", "-fopenmp", "-fsanitize=address,undefined",
           "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined", f"-I{ROOT}/csrc",
           os.path.join(ROOT, "tests", "native", harness), *[os.path.join(ROOT, s) for s in sources],
           "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    if build.returncode != 0 and "sanitize" in build.stderr and "cannot find" in build.stderr:
        pytest.skip("AddressSanitizer runtime not installed")
    assert build.returncode == 0, build.stderr[-3000:]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", OMP_NUM_THREADS="2")
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), (run.stdout[-2000:], run.stderr[-4000:])


@pytest.mark.skipif(CXX is None or not os.path.isdir(os.path.join(ROOT, "csrc")),
                    reason="needs a C++ compiler and the source tree")
@pytest.mark.parametrize("march", ["native", "x86-64"])  # the vector paths and the portable build
def test_sampler_step_in_bounds(tmp_path, march):
    if march == "x86-64" and os.uname().machine != "x86_64":
        pytest.skip("portable x86-64 build only on x86-64")
    _build_and_run(tmp_path, "sampler_step_bounds.cpp", ["csrc/cpu/sampler_step.cpp"], march)
