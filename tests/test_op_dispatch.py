"""One dispatch rule for every fused op (fastdiff/ops/_backend.py), and the C++ boundary checks.

On a machine without a GPU the CUDA choices are checked by construction: `assume_available`
says which backends exist, and `emulate_cuda` runs the `cuda` backend -- the kernels of
csrc/cuda compiled for the host (csrc/cuda/host_emulation.h) -- on CPU tensors through the
ops' own dispatch, against the same references as the other backends.
"""
import ast
import os
from pathlib import Path

import pytest
import torch

import fastdiff
from fastdiff import ops
from fastdiff.ops import _backend
from fastdiff.ops.group_norm import group_norm_silu_reference
from fastdiff.ops.sampler_step import coefficient_table, sampler_step_reference, sampler_step_table
from native_harness import cuda_emulation_module

ROOT = Path(__file__).resolve().parents[1]
native = pytest.mark.skipif(_backend.native_lib is None, reason="fastdiff._C not built")
COEFS = ops.StepCoefficients(1.3, -0.7, 0.45, 0.6, 0.3, -6.0, -3.0)


@pytest.fixture(scope="module")
def emulated():
    return cuda_emulation_module()


class _CountingLib:
    """A kernel module that counts the calls it forwards: shows which backend ran."""

    def __init__(self, lib):
        self._lib, self.calls = lib, []

    def __getattr__(self, name):
        target = getattr(self._lib, name)
        if not callable(target):
            return target

        def call(*args, **kwargs):
            self.calls.append(name)
            return target(*args, **kwargs)
        return call


# --------------------------------------------------------------------------- the choice
def _describe(op, device, dtype, **facts):
    return ops.backend_for(op, device=device, dtype=dtype, **facts)


def test_auto_order_on_cpu():
    x = torch.zeros(2, 4, 3, 3)
    if _backend.native_lib is not None:
        assert ops.backend_for("sampler_step", x) == "native"
        assert ops.backend_for("group_norm_silu", x) == "native"
    # attention: ATen's CPU flash kernel (measured faster than the native one), for fp32/bf16/fp16
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert ops.backend_for("attention", torch.zeros(1, 1, 4, 8, dtype=dtype)) == "aten"
    # what the native core does not store runs the reference
    assert ops.backend_for("group_norm_silu", x.double()) == "reference"
    assert ops.backend_for("group_norm_silu", x.half()) == "reference"
    assert ops.backend_for("attention", torch.zeros(1, 1, 4, 8, dtype=torch.float64)) == "reference"
    assert ops.backend_for("randn", device="cpu", dtype=torch.float16) == "reference"


@pytest.mark.parametrize("cuda, triton, op, dtype, expected", [
    (True, True, "sampler_step", torch.float32, "cuda"),     # the CUDA C++ core first
    (True, True, "sampler_step", torch.float64, "cuda"),
    (True, True, "randn", torch.bfloat16, "cuda"),
    (True, True, "group_norm_silu", torch.float16, "cuda"),
    (True, True, "group_norm_silu", torch.float64, "triton"),  # no float64 CUDA GroupNorm
    (True, True, "attention", torch.float16, "triton"),        # no CUDA C++ attention
    (True, True, "attention", torch.float64, "reference"),     # no float64 Triton attention
    (False, True, "sampler_step", torch.float32, "triton"),    # _C_cuda not built
    (False, True, "group_norm_silu", torch.bfloat16, "triton"),
    (True, False, "attention", torch.float32, "reference"),    # Triton not installed
    (False, False, "sampler_step", torch.float32, "reference"),
])
def test_auto_order_on_cuda_by_construction(cuda, triton, op, dtype, expected):
    with _backend.assume_available(cuda=cuda, triton=triton):
        assert _describe(op, "cuda", dtype, head_dim=64) == expected


def test_order_is_the_documented_one():
    doc = _backend.__doc__
    for line in ("CPU tensors:   native, reference            sampler_step, randn, group_norm_silu",
                 "aten, native, reference      attention",
                 "CUDA tensors:  cuda, triton, reference      sampler_step, randn, group_norm_silu",
                 "triton, reference            attention"):
        assert line in doc
    tables = _backend.tables()
    for op in ("sampler_step", "randn", "group_norm_silu"):
        assert tables[op].auto == {"cpu": ("native",), "cuda": ("cuda", "triton")}
    assert tables["attention"].auto == {"cpu": ("aten", "native"), "cuda": ("triton",)}
    for table in tables.values():
        assert "reference" in table.kernels and table.kernels["reference"].devices is None


def test_forced_backend_that_cannot_serve_raises():
    x = torch.zeros(2, 4, 3, 3)
    with ops.use_backend("cuda"), pytest.raises(ops.BackendError, match=r"group_norm_silu: backend 'cuda'"):
        ops.group_norm_silu(x, 2)  # CPU tensor, no emulation: never a silent reference run
    with ops.use_backend("cuda"), pytest.raises(ops.BackendError, match="sampler_step"):
        ops.sampler_step(x, x, COEFS, seed=0, step=0)
    with ops.use_backend("cuda"), pytest.raises(ops.BackendError, match="attention has no 'cuda' kernel"):
        ops.attention(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8))
    with ops.use_backend("aten"), pytest.raises(ops.BackendError, match="group_norm_silu has no 'aten' kernel"):
        ops.group_norm_silu(x, 2)
    with ops.use_backend("aten"), pytest.raises(ops.BackendError, match="supports dtypes float32, bfloat16, "
                                                "float16, got float64"):
        ops.attention(*(torch.zeros(1, 1, 4, 8, dtype=torch.float64),) * 3)
    if _backend.native_lib is not None:
        with ops.use_backend("native"), pytest.raises(ops.BackendError, match="float64"):
            ops.group_norm_silu(x.double(), 2)
        with ops.use_backend("native"), pytest.raises(ops.BackendError, match="float16"):
            ops.randn((2, 3), seed=0, dtype=torch.float16)
    with _backend.assume_available(triton=True, cuda=True):
        with pytest.raises(ops.BackendError, match="supports dtypes float32, float16, bfloat16, got float64"):
            ops.backend_for("attention", device="cuda", dtype=torch.float64, head_dim=64, requested="triton")
        with pytest.raises(ops.BackendError, match="head dim 512"):
            ops.backend_for("attention", device="cuda", dtype=torch.float16, head_dim=512, requested="triton")
        with pytest.raises(ops.BackendError, match="float64"):
            ops.backend_for("group_norm_silu", device="cuda", dtype=torch.float64, requested="cuda")


def test_backend_names_and_environment(monkeypatch):
    assert ops.BACKENDS == ("auto", "reference", "native", "triton", "cuda", "aten")
    monkeypatch.setenv("FASTDIFF_BACKEND", "cuda")
    assert ops.current_backend() == "cuda"
    with pytest.raises(ops.BackendError, match="backend 'cuda'"):
        ops.backend_for("sampler_step", torch.zeros(2, 3))
    monkeypatch.setenv("FASTDIFF_BACKEND", "gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.current_backend()
    with pytest.raises(ValueError, match="op must be one of"):
        ops.backend_for("conv", torch.zeros(2))


# --------------------------------------------------------------------------- cuda backend, emulated
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("variance", ["fixed", "learned", "learned_range"])
def test_cuda_backend_sampler_step_through_the_op(emulated, dtype, variance):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 5, 7, generator=gen, dtype=torch.float64)
    out = torch.randn(3, 2 * (2 if variance != "fixed" else 1), 5, 7, generator=gen, dtype=torch.float64)
    if variance == "learned_range":
        out[:, 2:] = out[:, 2:].clamp(-1, 1)
    counting = _CountingLib(emulated)
    with _backend.emulate_cuda(counting), ops.use_backend("cuda"):
        assert ops.backend_for("sampler_step", x.to(dtype)) == "cuda"
        got = ops.sampler_step(x.to(dtype), out.to(dtype), COEFS, seed=11, step=4, sample_offset=2,
                               clip_denoised=True, variance=variance)
        in_place = x.to(dtype).clone()
        ops.sampler_step(in_place, out.to(dtype), COEFS, seed=11, step=4, sample_offset=2, clip_denoised=True,
                         variance=variance, out=in_place)
        table = coefficient_table([COEFS] * 6)
        via_table = sampler_step_table(x.to(dtype), out.to(dtype), table, torch.tensor(4), seed=11, sample_offset=2,
                                       clip_denoised=True, variance=variance)
    assert counting.calls == ["sampler_step"] * 3  # the CUDA kernel ran, three times
    mode = {"fixed": 0, "learned": 1, "learned_range": 2}[variance]
    want = sampler_step_reference(x.to(dtype).double(), out.to(dtype).double(), COEFS.as_list(), 11, 4, 2, True, mode)
    tol = 1e-5 if dtype != torch.bfloat16 else 2 * torch.finfo(dtype).eps
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(in_place, got, rtol=0, atol=0)
    torch.testing.assert_close(via_table, got, rtol=0, atol=0)


def test_cuda_backend_randn_through_the_op(emulated):
    with _backend.emulate_cuda(emulated), ops.use_backend("cuda"):
        got = ops.randn((3, 101), seed=2**40 + 1, step=5, sample_offset=7)
    want = ops.philox_normal_reference(3, 101, seed=2**40 + 1, step=5, sample_offset=7)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backend_group_norm_silu_through_the_op(emulated, channels_last, dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 5, 7, generator=gen, dtype=torch.float64) * 2 + 1
    w = torch.randn(6, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    gy = torch.randn(2, 6, 5, 7, generator=gen, dtype=torch.float64)
    xd = x.to(dtype)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    xd.requires_grad_(True)
    wf, bf = w.float().requires_grad_(True), b.float().requires_grad_(True)
    counting = _CountingLib(emulated)
    with _backend.emulate_cuda(counting), ops.use_backend("cuda"):
        y = ops.group_norm_silu(xd, 3, wf, bf)
        y.backward(gy.to(dtype))
    assert counting.calls.count("group_norm_silu_forward") == 1
    assert counting.calls.count("group_norm_silu_backward") == 1
    xr = xd.detach().double().requires_grad_(True)
    wr, br = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ry, _, _ = group_norm_silu_reference(xr, 3, wr, br)
    ry.backward(gy.to(dtype).double())
    tol = 2e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(y.double(), ry.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(xd.grad.double(), xr.grad, rtol=4 * tol, atol=4 * tol)
    torch.testing.assert_close(wf.grad.double(), wr.grad, rtol=4 * tol, atol=40 * tol)
    torch.testing.assert_close(bf.grad.double(), br.grad, rtol=4 * tol, atol=40 * tol)


def test_cuda_backend_refuses_float64_group_norm(emulated):
    with _backend.emulate_cuda(emulated), ops.use_backend("cuda"):
        with pytest.raises(ops.BackendError, match="float64"):
            ops.group_norm_silu(torch.randn(2, 4, 3, dtype=torch.float64), 2)


# --------------------------------------------------------------------------- C++ boundary
def _step_kwargs(x, **over):
    kw = dict(x=x.data_ptr(), model_output=x.data_ptr(), y=x.data_ptr(), batch=2, numel_per_sample=4,
              output_sample_stride=4, a1=1.0, a2=0.0, c1=1.0, c2=0.0, sigma=0.0, min_log=0.0, max_log=0.0,
              seed=0, step=0, sample_offset=0, clip=False, variance_mode=0, dtype=0, num_threads=1)
    kw.update(over)
    return kw


@native
@pytest.mark.parametrize("over, match", [
    ({"dtype": 7}, "dtype code 7"),
    ({"dtype": 2}, r"dtype code 2 \(bfloat16\) is not supported"),   # bf16 is not a sampler_step case
    ({"variance_mode": 3}, "variance_mode"),
    ({"variance_mode": -1}, "variance_mode"),
    ({"batch": -1}, "batch"),
    ({"variance_mode": 1}, "output_sample_stride"),                  # learned needs 2 * numel per sample
    ({"sample_offset": 2**32 - 1}, "sample_offset"),
    ({"num_threads": 0}, "num_threads"),
])
def test_native_sampler_step_binding_checks(over, match):
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match=match):
        _backend.native_lib.sampler_step(**_step_kwargs(x, **over))


@native
def test_native_binding_checks_group_norm_and_attention():
    lib = _backend.native_lib
    x = torch.zeros(2, 4, 9)
    stats = torch.zeros(2, 2)
    aff = torch.zeros(4)

    def gn(**over):
        kw = dict(x=x.data_ptr(), weight=aff.data_ptr(), bias=aff.data_ptr(), y=x.data_ptr(),
                  mean=stats.data_ptr(), rstd=stats.data_ptr(), batch=2, channels=4, spatial=9, groups=2, eps=1e-5,
                  channels_last=False, act=True, dtype=0, num_threads=1)
        kw.update(over)
        lib.group_norm_silu_forward(**kw)

    gn()  # valid
    for over, match in [({"dtype": 3}, r"code 3 \(float64\)"), ({"dtype": 1}, "float16"), ({"groups": 3}, "divide"),
                        ({"groups": 0}, "groups"), ({"spatial": 0}, "spatial"), ({"eps": -1.0}, "eps")]:
        with pytest.raises(ValueError, match=match):
            gn(**over)
    q = torch.zeros(1, 1, 4, 300)
    lse = torch.zeros(1, 1, 4)

    def attn(**over):
        kw = dict(q=q.data_ptr(), k=q.data_ptr(), v=q.data_ptr(), out=q.data_ptr(), lse=lse.data_ptr(), batch=1,
                  heads=1, len_q=4, len_k=4, head_dim=256, q_stride=[1200, 1200, 300], k_stride=[1200, 1200, 300],
                  v_stride=[1200, 1200, 300], scale=0.1, dtype=0, num_threads=1)
        kw.update(over)
        lib.attention_forward(**kw)

    attn()  # valid: D = 256 is the widest compiled head dim
    for over, match in [({"head_dim": 257}, "head_dim"), ({"head_dim": 0}, "head_dim"), ({"dtype": 3}, "float64"),
                        ({"len_k": 0}, "len_k"), ({"scale": float("nan")}, "scale"),
                        ({"k_stride": [1, 1, -300]}, "stride")]:
        with pytest.raises(ValueError, match=match):
            attn(**over)


def test_cuda_binding_checks(emulated):
    x = torch.zeros(2, 8)

    def step(**over):
        kw = dict(x=x.data_ptr(), model_output=x.data_ptr(), y=x.data_ptr(), coef_table=0, step_index=0, table_rows=0, batch=2,
                  numel=4, out_stride=4, a1=1.0, a2=0.0, c1=1.0, c2=0.0, sigma=0.0, min_log=0.0, max_log=0.0, seed=0,
                  step=0, sample_offset=0, clip=False, variance_mode=0, storage=0, stream=0)
        kw.update(over)
        emulated.sampler_step(**kw)

    step()
    for over, match in [({"storage": 9}, "storage code 9"), ({"variance_mode": 5}, "variance_mode"),
                        ({"variance_mode": 2}, "out_stride"), ({"coef_table": x.data_ptr()}, "together"),
                        ({"batch": -2}, "batch")]:
        with pytest.raises(ValueError, match=match):
            step(**over)
    x3 = torch.zeros(2, 4, 9)
    stats = torch.zeros(2, 2)
    aff = torch.zeros(4)
    work = torch.zeros(2 * 2 * 4 * 9)

    def gn(**over):
        kw = dict(x=x3.data_ptr(), weight=aff.data_ptr(), bias=aff.data_ptr(), y=x3.data_ptr(), mean=stats.data_ptr(),
                  rstd=stats.data_ptr(), workspace=work.data_ptr(), n=2, c=4, s=9, groups=2, splits=1, eps=1e-5,
                  channels_last=False, act=True, storage=0, stream=0)
        kw.update(over)
        emulated.group_norm_silu_forward(**kw)

    gn()
    for over, match in [({"storage": 3}, r"code 3 \(float64\) is not supported"), ({"groups": 3}, "divide"),
                        ({"splits": 0}, "splits"), ({"splits": 10}, "splits"), ({"storage": -1}, "storage")]:
        with pytest.raises(ValueError, match=match):
            gn(**over)


@native
def test_one_dtype_code_table(emulated):
    assert _backend.native_lib.dtype_codes == emulated.dtype_codes
    assert sorted(emulated.dtype_codes) == ["bfloat16", "float16", "float32", "float64"]
    assert len(set(emulated.dtype_codes.values())) == 4


# --------------------------------------------------------------------------- layering
def test_kernel_modules_do_not_import_the_ops_layer():
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith("fastdiff.ops") and not name.startswith("fastdiff.nn"), \
                    f"{path.name} imports {name}: kernel modules sit below the ops layer"


def test_helpers_have_one_home():
    ops_sources = "\n".join(p.read_text() for p in (ROOT / "fastdiff" / "ops").glob("*.py"))
    kernel_sources = "\n".join(p.read_text() for p in (ROOT / "triton_kernels").glob("*.py"))
    for name in ("_NATIVE_DTYPES", "def _stats_dtype", "def _affine", "def _empty_in_layout", "def _layout(",
                 "def _empty_like_layout", "def _channels_last", "def _dense_head_dim"):
        assert name not in ops_sources and name not in kernel_sources, name


def test_public_names():
    assert fastdiff.ops.backend_for is _backend.backend_for
    assert issubclass(ops.BackendError, RuntimeError)
    assert os.environ.get("FASTDIFF_BACKEND", "auto") in ops.BACKENDS
