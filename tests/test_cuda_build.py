"""The CUDA C++ kernels (csrc/cuda, module fastdiff._C_cuda), and bench/gpu_check.py.

Without a GPU: nvcc compiles every translation unit (the "CI compiles them" check), the
built module imports and answers, and the kernels' source, compiled for the host through
csrc/cuda/host_emulation.h, matches the pure-torch references. With
FASTDIFF_TEST_DEVICE=cuda on a GPU machine the same comparisons run on the device too.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from fastdiff import ops
from fastdiff.ops.group_norm import group_norm_silu_reference
from fastdiff.ops.sampler_step import coefficient_table, sampler_step_reference
from fastdiff.triton_kernels import cuda_native
from native_harness import cuda_emulation_module

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
DEVICE = torch.device(os.environ.get("FASTDIFF_TEST_DEVICE", "cpu"))
NVCC = shutil.which("nvcc")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
needs_gpu = pytest.mark.skipif(not cuda_native.available() or DEVICE.type != "cuda",
                               reason="needs fastdiff._C_cuda, a GPU and FASTDIFF_TEST_DEVICE=cuda")


def test_cuda_sources_exist():
    names = {p.name for p in CUDA_SOURCES}
    assert {"sampler_step.cu", "group_norm_silu.cu"} <= names
    assert (ROOT / "csrc" / "cuda" / "bindings.cpp").exists()


@needs_nvcc
def test_nvcc_compiles_every_kernel(tmp_path):
    # One architecture keeps this quick; the package build compiles 80;90.
    for src in CUDA_SOURCES:
        cmd = [NVCC, "-std=c++17", "-O2", "-arch=sm_80", "-Werror", "all-warnings", f"-I{ROOT / 'csrc'}", "-c",
               str(src), "-o", str(tmp_path / (src.stem + ".o"))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
        assert (tmp_path / (src.stem + ".o")).stat().st_size > 0


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:  # the triton wheel bundles one
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(bundled) if bundled.exists() else None
    except ImportError:
        return None


@needs_nvcc
def test_cuda_sampler_step_uses_vector_loads(tmp_path):
    """#18: the sampler kernel loaded 4 scalars at a stride per thread; on 4-aligned rows it now
    loads and stores one 16-byte vector (LDG.E.128 / STG.E.128 in the sm_90 SASS)."""
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump")
    cubin = tmp_path / "sampler_step.cubin"
    cmd = [NVCC, "-std=c++17", "-O3", "-arch=sm_90", f"-I{ROOT / 'csrc'}", "-cubin",
           str(ROOT / "csrc" / "cuda" / "sampler_step.cu"), "-o", str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, timeout=300).stdout
    functions = sass.split("Function : ")[1:]
    fp32_step = [f for f in functions if "sampler_step_kernelIf" in f.split("\n", 1)[0]]
    assert fp32_step
    assert any("LDG.E.128" in f and "STG.E.128" in f for f in fp32_step)


@needs_nvcc
def test_built_module_imports_when_nvcc_present():
    """An AUTO build on a machine with nvcc produces fastdiff._C_cuda; it answers without a GPU."""
    if not cuda_native.built():
        pytest.skip("fastdiff was built without the CUDA module (FASTDIFF_CUDA=OFF or built before csrc/cuda "
                    "existed); `pip install --no-build-isolation -e .` rebuilds it")
    lib = cuda_native.lib
    for name in ("sampler_step", "philox_normal", "group_norm_silu_forward", "group_norm_silu_backward"):
        assert callable(getattr(lib, name))
    assert lib.device_count() == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert lib.group_norm_splits(64, 128, 32 * 32, False) >= 1
    # the CPU core does not depend on the CUDA module
    out = subprocess.run([sys.executable, "-c", "import fastdiff._C as c; print(c.__name__)"], capture_output=True,
                         text=True, timeout=120, cwd=tempfile.mkdtemp())  # the installed package, not the tree
    assert out.returncode == 0, out.stderr


def test_cuda_launchers_reject_cpu_tensors():
    if not cuda_native.built():
        pytest.skip("fastdiff._C_cuda not built")
    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_native.sampler_step_cuda(x, x, [1.0] * 7, 0, 0, 0, False, 0)


# --------------------------------------------------------------------------- the kernels' results
# Two ways to run csrc/cuda: on the GPU (FASTDIFF_TEST_DEVICE=cuda), and on the CPU through
# csrc/cuda/host_emulation.h -- the same kernel source compiled by g++, each block's threads
# as std::threads -- so that the kernels' indexing, tiling, reductions and layouts are checked
# against the references on any machine with a C++20 compiler.
@pytest.fixture(scope="module")
def emulated_lib():
    return cuda_emulation_module()


@pytest.fixture(params=["emulated", pytest.param("gpu", marks=needs_gpu)])
def cuda_impl(request):
    """(device, lib): CPU tensors with the host-emulated kernels, or CUDA tensors with fastdiff._C_cuda."""
    if request.param == "emulated":
        return torch.device("cpu"), request.getfixturevalue("emulated_lib")
    return DEVICE, None


COEFS = [1.3, -0.7, 0.45, 0.6, 0.3, -6.0, -3.0]


@pytest.mark.parametrize("width", [9, 8], ids=["odd rows", "4-aligned rows"])  # scalar and vector accesses
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_cuda_sampler_step_matches_reference(cuda_impl, dtype, mode, width):
    device, lib = cuda_impl
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 17, width, generator=gen, dtype=torch.float64).to(dtype)
    out = torch.randn(3, 3 * (2 if mode else 1), 17, width, generator=gen, dtype=torch.float64)
    if mode == 2:
        out[:, 3:] = out[:, 3:].clamp(-1, 1)
    out = out.to(dtype)
    got = cuda_native.sampler_step_cuda(x.to(device), out.to(device), COEFS, 2**33 + 1, 7, 5, True, mode, _lib=lib)
    want = sampler_step_reference(x.double(), out.double(), COEFS, 2**33 + 1, 7, 5, True, mode)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)
    else:  # fp32 maths, one rounding to the storage type
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got.cpu().double(), want, rtol=eps, atol=2 * eps)
    table = coefficient_table([ops.StepCoefficients(*COEFS)] * 8, device=device)
    via_table = cuda_native.sampler_step_table_cuda(x.to(device), out.to(device), table,
                                                    torch.tensor(7, device=device), 2**33 + 1, 5, True, mode, _lib=lib)
    torch.testing.assert_close(via_table, got, rtol=0, atol=0)


def test_cuda_sampler_step_without_noise_is_the_mean(cuda_impl):
    device, lib = cuda_impl
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    out = torch.randn(2, 5, 3, dtype=torch.float64)
    coefs = COEFS[:4] + [0.0] + COEFS[5:]
    got = cuda_native.sampler_step_cuda(x.to(device), out.to(device), coefs, 1, 2, 0, False, 0, _lib=lib)
    torch.testing.assert_close(got.cpu(), coefs[2] * (coefs[0] * x + coefs[1] * out) + coefs[3] * x)


def test_cuda_randn_matches_reference(cuda_impl):
    device, lib = cuda_impl
    ref = ops.philox_normal_reference(5, 1001, seed=2**40 + 3, step=0xFFFFFFFF, sample_offset=2)
    got = cuda_native.randn_cuda((5, 1001), 2**40 + 3, 0xFFFFFFFF, 2, device=device, _lib=lib)
    torch.testing.assert_close(got.cpu().double(), ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("shape, groups, channels_last, dtype", [
    ((2, 6, 5, 7), 3, False, torch.float32),        # non-aligned, one split
    ((2, 6, 5, 7), 3, True, torch.float32),
    ((1, 4, 40, 40), 2, False, torch.float32),      # S split over several blocks
    ((1, 40, 10, 13), 8, True, torch.float32),      # channels_last, two channel tiles, S splits
    ((3, 4, 1, 1), 2, False, torch.float32),        # S = 1
    ((2, 16, 9, 9), 4, True, torch.bfloat16),
    ((2, 16, 9, 9), 4, False, torch.float16),
])
def test_cuda_group_norm_silu_matches_reference(cuda_impl, shape, groups, channels_last, dtype):
    device, lib = cuda_impl
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
    w = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    gy = torch.randn(shape, generator=gen, dtype=torch.float64)
    xd = x.to(device, dtype)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    x3 = xd.flatten(2)
    y, mean, rstd = cuda_native.group_norm_silu_fwd_cuda(x3, w.float().to(device), b.float().to(device), groups,
                                                         1e-5, True, _lib=lib)
    gx, gw, gb = cuda_native.group_norm_silu_bwd_cuda(gy.to(device, dtype).flatten(2), x3, w.float().to(device),
                                                      b.float().to(device), mean, rstd, groups, 1e-5, True, _lib=lib)
    xr = xd.double().cpu().flatten(2).requires_grad_(True)
    wr, br = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ry, _, rrstd = group_norm_silu_reference(xr, groups, wr, br, 1e-5, True)
    rgx, rgw, rgb = torch.autograd.grad(ry, (xr, wr, br), gy.to(dtype).double().flatten(2))
    assert y.stride()[1:] == x3.stride()[1:] and gx.stride()[1:] == x3.stride()[1:] and y.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(rstd.cpu().double(), rrstd.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.cpu().double(), ry.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(gx.cpu().double(), rgx, rtol=4 * tol, atol=4 * tol)
    scale = (x3.shape[0] * x3.shape[2]) ** 0.5
    torch.testing.assert_close(gw.cpu().double(), rgw, rtol=4 * tol, atol=4 * tol * scale)
    torch.testing.assert_close(gb.cpu().double(), rgb, rtol=4 * tol, atol=4 * tol * scale)


# --------------------------------------------------------------------------- bench/gpu_check.py (CPU parts)
def _load_bench_module(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_fastdiff_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load_bench_module("gpu_check")


def test_gpu_check_plan_fits_the_budget(tmp_path):
    steps = gpu_check.plan(tmp_path)
    names = [s.name for s in steps]
    assert names[:5] == ["env", "build", "build-triton", "warm", "gpu-tests"]
    assert names[5:] == [f"bench-{g}" for g in gpu_check.BENCH_GROUPS]
    # worst case 5 minutes: a second run and the machine's start-up fit in about 12 minutes
    assert gpu_check.worst_case_seconds(steps) <= gpu_check.WORST_CASE_S <= 300
    build, fallback = steps[1], steps[2]
    assert "-Ccmake.define.FASTDIFF_CUDA=ON" in build.cmd and "-Ccmake.define.FASTDIFF_CUDA=OFF" in fallback.cmd
    assert fallback.only_if_failed == "build"
    tests = steps[4]
    assert tests.env["FASTDIFF_TEST_DEVICE"] == "cuda" and "tests/" not in tests.cmd  # not the whole suite
    assert all(f in tests.cmd for f in gpu_check.GPU_TEST_FILES) and "_gpu_results" in tests.cmd
    assert tests.json_out.endswith(".jsonl") and tests.env["FASTDIFF_TEST_TIMEOUT"] == str(gpu_check.TEST_TIMEOUT_S)
    caches = {s.env.get("TRITON_CACHE_DIR") for s in steps[3:]}
    assert len(caches) == 1 and None not in caches  # one compile cache kept across steps
    assert all(s.json_out and s.json_out.startswith(str(tmp_path)) for s in steps[5:])
    short = gpu_check.plan(tmp_path, skip_build=True, skip_tests=True, groups=("attention",))
    assert [s.name for s in short] == ["env", "warm", "bench-attention"]


def test_gpu_check_dry_run_prints_the_plan_and_budget(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "worst case" in printed and "gpu-tests" in printed and "only if build failed" in printed


def test_gpu_check_keeps_rows_of_a_killed_step(tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    writer = ("import json, time\n"
              f"f = open({str(rows_file)!r}, 'a')\n"
              "for i in range(3):\n    f.write(json.dumps({'test': f't{i}', 'outcome': 'passed'}) + '\\n'); f.flush()\n"
              "f.write('{\"test\": \"half a li'); f.flush(); time.sleep(60)\n")
    result = gpu_check.run_step(gpu_check.Step("t", [sys.executable, "-c", writer], 3, json_out=str(rows_file)),
                                cwd=tmp_path)
    assert result.status == "timeout"
    assert [r["test"] for r in result.rows] == ["t0", "t1", "t2"]


def test_gpu_results_plugin_limits_each_test(tmp_path):
    """One hung test costs one row: the others still run and every verdict is on disk."""
    (tmp_path / "test_sample.py").write_text("import time\n\ndef test_fast():\n    pass\n\n"
                                              "def test_hangs():\n    time.sleep(30)\n\ndef test_after():\n    pass\n")
    jsonl = tmp_path / "out.jsonl"
    env = dict(os.environ, FASTDIFF_RESULTS_JSONL=str(jsonl), FASTDIFF_TEST_TIMEOUT="1",
               PYTHONPATH=str(ROOT / "bench"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "_gpu_results", "-p", "no:cacheprovider",
                           str(tmp_path / "test_sample.py")], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    import json

    rows = {r["test"].split("::")[-1]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    assert rows["test_fast"]["outcome"] == "passed" and rows["test_after"]["outcome"] == "passed"
    assert rows["test_hangs"]["outcome"] == "failed" and "FASTDIFF_TEST_TIMEOUT" in rows["test_hangs"]["message"]
    assert proc.returncode == 1


def test_gpu_check_arguments(monkeypatch):
    monkeypatch.setenv("OUT", "/some/out")
    args = gpu_check.parse_args([])
    assert args.out == "/some/out" and not args.dry_run and args.bench is None
    args = gpu_check.parse_args(["--out", "x", "--dry-run", "--bench", "copy", "--bench", "sampling", "--skip-build"])
    assert (args.out, args.dry_run, args.bench, args.skip_build) == ("x", True, ["copy", "sampling"], True)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--bench", "nonsense"])


def test_gpu_check_dry_run_writes_both_reports(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    import json

    payload = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["status"] for s in payload["steps"]] == ["dry-run"] * 10
    assert payload["meta"]["dry_run"] is True
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# fastdiff GPU check") and "| bench-sampling | dry-run |" in md


def test_gpu_check_step_statuses_and_rows(tmp_path):
    import json

    rows_file = tmp_path / "rows.json"
    writer = ("import json, sys; json.dump([{'group': 'g', 'name': 'kernel A', 'ms': 1.5, 'gbs': 3000.0}], "
              f"open({str(rows_file)!r}, 'w')); print('done')")
    ok = gpu_check.run_step(gpu_check.Step("bench-g", [sys.executable, "-c", writer], 60, json_out=str(rows_file)),
                            cwd=tmp_path)
    assert ok.status == "ok" and ok.returncode == 0 and "done" in ok.output_tail
    assert ok.rows == [{"group": "g", "name": "kernel A", "ms": 1.5, "gbs": 3000.0}]
    failed = gpu_check.run_step(gpu_check.Step("f", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                                               60), cwd=tmp_path)
    assert failed.status == "failed" and failed.returncode == 3 and "boom" in failed.output_tail
    slow = gpu_check.run_step(gpu_check.Step("t", [sys.executable, "-c", "import time; time.sleep(60)"], 1),
                              cwd=tmp_path)
    assert slow.status == "timeout" and slow.seconds < 30
    paths = gpu_check.write_results(tmp_path / "out", [ok, failed, slow], {"k": "v"})
    md = paths["markdown"].read_text()
    assert "| kernel A | 1.5 | 3000 |" in md
    assert "## f: failed" in md and "boom" in md and "## t: timeout" in md
    assert json.loads(paths["json"].read_text())["steps"][2]["status"] == "timeout"


def test_bench_gpu_cli_without_a_gpu():
    bench = _load_bench_module("bench_gpu")
    assert bench.parse_args(["--only", "copy", "--only", "attention"]).only == ["copy", "attention"]
    assert set(bench.BENCHES) == set(bench.GROUPS) == set(gpu_check.BENCH_GROUPS)
    listed = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--list"], capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0 and listed.stdout.split() == list(bench.GROUPS)
    if not torch.cuda.is_available():
        assert bench.main(["--only", "copy"]) == 2


def test_gpu_check_env_probe_runs_here(tmp_path):
    import json

    env_step = gpu_check.plan(tmp_path, skip_build=True, skip_tests=True, groups=())[0]
    result = gpu_check.run_step(env_step)
    assert result.status == "ok", result.output_tail
    info = json.loads(result.output_tail.strip().splitlines()[-1])
    assert info["torch"] == torch.__version__ and "triton" in info and "gpu" in info
