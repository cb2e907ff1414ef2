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


_EMULATION = {}


def cuda_emulation_module():
    """csrc/cuda (kernels and bindings) compiled for the host through csrc/cuda/host_emulation.h
    and imported as `_C_cuda_emu`: the CUDA kernels' own code on CPU tensors. Built once per
    source version (cached in the temp dir by a hash of the sources) and once per process."""
    import hashlib
    import importlib.util
    import sysconfig
    import tempfile

    import pybind11

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the host emulation")
    sources = sorted(p for p in (os.path.join(ROOT, "csrc", "cuda", n) for n in os.listdir(os.path.join(ROOT, "csrc", "cuda")))
                     if p.endswith(".cu")) + [os.path.join(ROOT, "csrc", "cuda", "bindings.cpp")]
    headers = [os.path.join(ROOT, "csrc", d, n) for d in ("", "cuda") for n in os.listdir(os.path.join(ROOT, "csrc", d))
               if n.endswith((".h", ".cuh"))]
    digest = hashlib.sha256()
    for path in sorted(sources + headers):
        with open(path, "rb") as f:
            digest.update(path.encode() + f.read())
    key = digest.hexdigest()[:16]
    if key in _EMULATION:
        return _EMULATION[key]
    out_dir = os.path.join(tempfile.gettempdir(), f"fastdiff_cuda_emu_{os.getuid()}_{key}")
    target = os.path.join(out_dir, "_C_cuda_emu" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not os.path.exists(target):
        os.makedirs(out_dir, exist_ok=True)
        partial = target + f".{os.getpid()}.tmp"
        cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-DFASTDIFF_CUDA_HOST_EMULATION",
               "-DFASTDIFF_CUDA_MODULE_NAME=_C_cuda_emu", f"-I{pybind11.get_include()}",
               f"-I{sysconfig.get_paths()['include']}", f"-I{os.path.join(ROOT, 'csrc')}", "-x", "c++", *sources,
               "-o", partial]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        os.replace(partial, target)  # atomic: a concurrent run sees a whole module or none
    spec = importlib.util.spec_from_file_location("_C_cuda_emu", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _EMULATION[key] = module
    return module
