"""Every Triton kernel against the pure-torch references.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set here, before
the kernels are defined: the interpreter is chosen when `@triton.jit` runs, so modules
imported earlier in the session are reloaded). With FASTDIFF_TEST_DEVICE=cuda they run
compiled on the GPU, and the bf16 cases (no bf16 arithmetic in the interpreter) run too.
"""
import importlib
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch

DEVICE = torch.device(os.environ.get("FASTDIFF_TEST_DEVICE", "cpu"))
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from fastdiff import ops  # noqa: E402
from fastdiff.ops.attention import attention_reference  # noqa: E402
from fastdiff.ops.group_norm import group_norm_silu_reference  # noqa: E402
from fastdiff.ops.philox import INITIAL_NOISE_STEP, philox4x32_10  # noqa: E402
from fastdiff.ops.sampler_step import coefficient_table, sampler_step_reference, sampler_step_table  # noqa: E402


def _kernels(name):
    module = importlib.import_module(f"fastdiff.triton_kernels.{name}")
    return importlib.reload(module) if DEVICE.type == "cpu" else module


tk_step = _kernels("sampler_step")
tk_gn = _kernels("group_norm_silu")
tk_attn = _kernels("attention")

if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("FASTDIFF_TEST_DEVICE=cuda but no GPU", allow_module_level=True)

DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE.type == "cpu",
                                                                reason="no bf16 arithmetic in the interpreter"))]


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _lowp_bound(kernel_out, ref64, torch_lowp, atol):
    """flash-attention's criterion: the kernel may be as inexact as torch in the same dtype."""
    err = (kernel_out.double().cpu() - ref64).abs().max().item()
    torch_err = (torch_lowp.double().cpu() - ref64).abs().max().item()
    assert err <= 2 * torch_err + atol, f"kernel error {err:.3g} vs torch's own {torch_err:.3g}"


# --------------------------------------------------------------------------- they compile
@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU the kernels compile and run for real")
def test_kernels_compile_for_sm90():
    """The interpreter does not compile; this runs Triton's real compiler down to cubin for an
    H100/H200 target (no GPU needed), through the launchers' own argument specialisation."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastdiff.triton_kernels.aot_check", "--arch", "90"],
                          capture_output=True, text=True, timeout=900, env=env,
                          cwd=tempfile.mkdtemp())  # the installed package, not the source tree
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "compiled" in proc.stdout and "attention" in proc.stdout and "group_norm_silu" in proc.stdout


# --------------------------------------------------------------------------- Philox
@pytest.mark.parametrize("counter, key, expected", [
    # Random123 known answers for philox4x32_10 (Salmon et al., SC'11).
    ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0x299F31D0 << 32) | 0xA4093822,
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    out = tk_step.philox_bits_triton(torch.tensor(counter, dtype=torch.int64).reshape(4, 1).to(DEVICE), key)
    assert tuple(out.flatten().tolist()) == expected


def test_philox_integers_equal_reference():
    gen = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 2**32, (4, 700), generator=gen, dtype=torch.int64)
    key = (0x9E3779B97F4A7C15 * 3) & 0xFFFFFFFFFFFFFFFF
    want = torch.stack(philox4x32_10(*counters, key))
    assert torch.equal(tk_step.philox_bits_triton(counters.to(DEVICE), key).cpu(), want)


@pytest.mark.parametrize("numel", [1, 3, 4, 5, 1023, 1024, 1025, 2100])
@pytest.mark.parametrize("seed, step", [(0, 0), (2**40 + 7, 5), (2**63 - 1, INITIAL_NOISE_STEP)])
def test_randn_matches_reference(numel, seed, step):
    ref = ops.philox_normal_reference(3, numel, seed=seed, step=step, sample_offset=9)
    got = tk_step.randn_triton((3, numel), seed=seed, step=step, sample_offset=9, device=DEVICE)
    # same integers; fp32 log/sqrt/sincos against float64
    torch.testing.assert_close(got.double().cpu(), ref, rtol=2e-6, atol=2e-6)


# --------------------------------------------------------------------------- sampler_step
COEFS = [1.3, -0.7, 0.45, 0.6, 0.3, -6.0, -3.0]


def _step_inputs(variance, dtype, shape=(3, 3, 7, 5), seed=0):
    x = _randn(*shape, seed=seed)
    channels = shape[1] * (2 if variance else 1)
    out = _randn(shape[0], channels, *shape[2:], seed=seed + 1)
    if variance == 2:
        out[:, shape[1]:] = out[:, shape[1]:].clamp(-1, 1)
    return x.to(DEVICE, dtype), out.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("variance_mode", [0, 1, 2])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_sampler_step_matches_reference(dtype, variance_mode, clip, sigma):
    x, out = _step_inputs(variance_mode, dtype)
    coefs = COEFS[:4] + [sigma] + COEFS[5:]
    got = tk_step.sampler_step_triton(x, out, coefs, 2**33 + 5, 17, 4, clip, variance_mode)
    want = sampler_step_reference(x.cpu().double(), out.cpu().double(), coefs, 2**33 + 5, 17, 4, clip,
                                  variance_mode)
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
    else:  # fp32 maths, one rounding to the storage type
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got.double().cpu(), want, rtol=eps, atol=2 * eps)


def test_sampler_step_through_the_op_and_strided_output():
    x, out = _step_inputs(1, torch.float32, shape=(4, 2, 9, 9))
    c = ops.StepCoefficients(*COEFS)
    with ops.use_backend("triton"):
        full = ops.sampler_step(x, out, c, seed=3, step=2, clip_denoised=True, variance="learned")
        # a DDIM step is handed the mean half of a learned-variance output: a strided view
        mean_view = ops.sampler_step(x, out[:, :2], c, seed=3, step=2, variance="fixed")
        assert not out[:, :2].is_contiguous()
        # batch invariance: sample 3 alone with sample_offset=3 draws the same noise
        alone = ops.sampler_step(x[3:], out[3:], c, seed=3, step=2, sample_offset=3, clip_denoised=True,
                                 variance="learned")
    with ops.use_backend("reference"):
        want = ops.sampler_step(x.cpu(), out.cpu(), c, seed=3, step=2, clip_denoised=True, variance="learned")
        want_mean = ops.sampler_step(x.cpu(), out[:, :2].cpu(), c, seed=3, step=2, variance="fixed")
    torch.testing.assert_close(full.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean_view.cpu(), want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, full[3:], rtol=0, atol=0)


@pytest.mark.parametrize("variance_mode", [0, 2])
@pytest.mark.parametrize("index", [0, 2])
def test_table_kernel_equals_per_step_kernel(variance_mode, index):
    x, out = _step_inputs(variance_mode, torch.float32)
    rows = [ops.StepCoefficients(*COEFS), ops.StepCoefficients(1.0, -0.5, 0.2, 0.9, 0.0),
            ops.StepCoefficients(0.7, -0.1, 0.6, 0.3, 1.1, -5.0, -1.0)]
    table = coefficient_table(rows, device=DEVICE)
    got = tk_step.sampler_step_table_triton(x, out, table, torch.tensor(index, device=DEVICE), 11, 2, True,
                                            variance_mode)
    want = tk_step.sampler_step_triton(x, out, rows[index].as_list(), 11, index, 2, True, variance_mode)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with ops.use_backend("triton"):  # and through the custom op
        op = sampler_step_table(x, out, table, torch.tensor(index, device=DEVICE), seed=11, sample_offset=2,
                                clip_denoised=True, variance=("fixed", "learned", "learned_range")[variance_mode])
    torch.testing.assert_close(op, want, rtol=0, atol=0)


# --------------------------------------------------------------------------- group_norm_silu
GN_CASES = [
    # (N, C, spatial, G), small tiles so that several channel blocks and S splits occur
    ((1, 4, (1,), 2), dict(tile_elements=16, target_programs=8)),      # minimal, S = 1
    ((2, 6, (5, 7), 3), dict(tile_elements=16, target_programs=64)),   # non-aligned, split S
    ((2, 32, (4, 4), 8), dict()),                                       # default config
    ((1, 12, (9,), 1), dict(tile_elements=32, target_programs=16)),    # one group of all channels
]


def _gn_ref(x, g, w, b, act, grad_y):
    xr, wr, br = (t.detach().double().cpu().requires_grad_(True) for t in (x, w, b))
    y, mean, rstd = group_norm_silu_reference(xr, g, wr, br, 1e-5, act)
    grads = torch.autograd.grad(y, (xr, wr, br), grad_y.double().cpu())
    return y.detach(), mean.detach(), rstd.detach(), grads


@pytest.mark.parametrize("case, cfg", GN_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", [True, False])
def test_group_norm_silu_fp32_matches_reference(case, cfg, channels_last, act):
    n, c, spatial, g = case
    x = (_randn(n, c, *spatial, seed=1) * 3 + 2).float()
    w, b = _randn(c, seed=2).float(), _randn(c, seed=3).float()
    grad_y = _randn(n, c, *spatial, seed=4).float()
    x3 = x.to(DEVICE).flatten(2)
    if channels_last:
        x3 = x3.transpose(1, 2).contiguous().transpose(1, 2)
    y, mean, rstd = tk_gn.group_norm_silu_fwd_triton(x3, w.to(DEVICE), b.to(DEVICE), g, 1e-5, act, **cfg)
    assert y.stride()[1:] == x3.stride()[1:] and mean.shape == (n, g) and mean.dtype == torch.float32
    gx, gw, gb = tk_gn.group_norm_silu_bwd_triton(grad_y.to(DEVICE).flatten(2), x3, w.to(DEVICE), b.to(DEVICE),
                                                  mean, rstd, g, 1e-5, act, **cfg)
    assert gx.stride()[1:] == x3.stride()[1:] and gw.shape == (c,) and gb.dtype == torch.float32
    ry, rmean, rrstd, (rgx, rgw, rgb) = _gn_ref(x.flatten(2), g, w, b, act, grad_y.flatten(2))
    # tolerances scale with rstd: (x - mean) * rstd amplifies fp32 rounding of x's spread
    tol = 2e-5 * max(1.0, rrstd.max().item())
    torch.testing.assert_close(mean.cpu().double(), rmean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.cpu().double(), rrstd, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.cpu().double(), ry, rtol=tol, atol=tol)
    torch.testing.assert_close(gx.cpu().double(), rgx, rtol=tol, atol=tol)
    torch.testing.assert_close(gw.cpu().double(), rgw, rtol=tol, atol=tol * math.sqrt(n * x3.shape[2]))
    torch.testing.assert_close(gb.cpu().double(), rgb, rtol=tol, atol=tol * math.sqrt(n * x3.shape[2]))


def test_group_norm_statistics_do_not_cancel():
    # |mean| >> std: a sum-of-squares variance in fp32 would lose every digit here.
    x = (1000.0 + 1e-2 * _randn(2, 8, 64, seed=5)).float()
    y, mean, rstd = tk_gn.group_norm_silu_fwd_triton(x.to(DEVICE), None, None, 2, 1e-5, False,
                                                     tile_elements=32, target_programs=16)
    _, rmean, rrstd = group_norm_silu_reference(x.double(), 2, eps=1e-5, act=False)
    torch.testing.assert_close(rstd.cpu().double(), rrstd, rtol=2e-3, atol=0)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32] + [torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_low_precision(dtype, channels_last):
    n, c, h, w_, g = 2, 8, 5, 6, 4
    x = _randn(n, c, h, w_, seed=6) * 2 + 1
    w, b = _randn(c, seed=7), _randn(c, seed=8)
    grad_y = _randn(n, c, h, w_, seed=9)
    x_lp = x.to(DEVICE, dtype)
    if channels_last:
        x_lp = x_lp.contiguous(memory_format=torch.channels_last)
    x3 = x_lp.flatten(2)
    wt = w.float() if dtype != torch.float64 else w
    bt = b.float() if dtype != torch.float64 else b
    y, mean, rstd = tk_gn.group_norm_silu_fwd_triton(x3, wt.to(DEVICE), bt.to(DEVICE), g, 1e-5, True,
                                                     tile_elements=32, target_programs=16)
    gx, gw, gb = tk_gn.group_norm_silu_bwd_triton(grad_y.to(DEVICE, dtype).flatten(2), x3, wt.to(DEVICE),
                                                  bt.to(DEVICE), mean, rstd, g, 1e-5, True,
                                                  tile_elements=32, target_programs=16)
    assert y.dtype == dtype and gx.dtype == dtype
    ry, _, _, (rgx, _, _) = _gn_ref(x_lp.double().flatten(2), g, w, b, True, grad_y.flatten(2))
    if dtype == torch.float64:
        torch.testing.assert_close(y.cpu(), ry, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gx.cpu(), rgx, rtol=1e-10, atol=1e-10)
        return
    # torch in the same dtype: GroupNorm + SiLU on the rounded input, rounded output
    torch_y = torch.nn.functional.silu(torch.nn.functional.group_norm(
        x_lp.float().cpu(), g, w.float(), b.float())).to(dtype).flatten(2)
    _lowp_bound(y, ry, torch_y, atol=torch.finfo(dtype).eps)
    _lowp_bound(gx, rgx, rgx.to(dtype), atol=4 * torch.finfo(dtype).eps)


# --------------------------------------------------------------------------- attention
ATTN_CASES = [
    (1, 2, 19, 23, 8),     # smallest head dim, non-aligned lengths
    (2, 1, 33, 16, 40),    # D not a power of two
    (1, 1, 5, 70, 64),     # few queries, many keys
]


@pytest.mark.parametrize("b, h, lq, lk, d", ATTN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_reference(b, h, lq, lk, d, dtype):
    q, k, v = _randn(b, h, lq, d, seed=1), _randn(b, h, lk, d, seed=2), _randn(b, h, lk, d, seed=3)
    grad_out = _randn(b, h, lq, d, seed=4)
    scale = 1.0 / math.sqrt(d)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref, ref_lse = attention_reference(qr, kr, vr, scale)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), grad_out)
    q_, k_, v_, go = (t.to(DEVICE, dtype) for t in (q, k, v, grad_out))
    out, lse = tk_attn.attention_fwd_triton(q_, k_, v_, scale, 16, 16)
    grads = tk_attn.attention_bwd_triton(go, q_, k_, v_, out, lse, scale, 16, 16)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b, h, lq)
    if dtype == torch.float32:
        torch.testing.assert_close(out.cpu().double(), ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.cpu().double(), ref_lse.detach(), rtol=1e-5, atol=1e-5)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g.cpu().double(), rg, rtol=1e-5, atol=1e-5)
        return
    # torch's own attention in the same dtype (computed in fp32 from rounded inputs, rounded)
    lp = [t.to(dtype).float().requires_grad_(True) for t in (q, k, v)]
    torch_out, _ = attention_reference(*lp, scale)
    torch_grads = torch.autograd.grad(torch_out, lp, grad_out.to(dtype).float())
    eps = torch.finfo(dtype).eps
    _lowp_bound(out, ref.detach(), torch_out.detach().to(dtype), atol=eps)
    for g, rg, tg in zip(grads, ref_grads, torch_grads):
        _lowp_bound(g, rg, tg.to(dtype), atol=4 * eps)


def test_attention_strided_inputs_and_default_blocks():
    # q, k, v as views of one (B, L, 3, H, D) projection, the way the U-Net builds them
    b, length, h, d = 2, 20, 2, 16
    qkv = _randn(b, length, 3, h, d, seed=5).float().to(DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out, lse = tk_attn.attention_fwd_triton(q, k, v, 0.3)
    ref, ref_lse = attention_reference(q.cpu().double(), k.cpu().double(), v.cpu().double(), 0.3)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_attention_fp64_is_the_tables_choice_not_the_launchers():
    """The launcher refuses float64; the op's table sends it to the reference under auto and
    refuses a forced Triton backend (no silent fallback inside the kernel module)."""
    q = _randn(1, 1, 4, 8, seed=6).to(DEVICE)
    with pytest.raises(TypeError, match="fp32, fp16 and bf16"):
        tk_attn.attention_fwd_triton(q, q, q, 0.5)
    with ops.use_backend("triton"), pytest.raises(ops.BackendError, match="float64"):
        ops.attention(q, q, q, 0.5)
    if DEVICE.type == "cuda":
        assert ops.backend_for("attention", q) == "reference"


# --------------------------------------------------------------------------- through the custom ops
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_op_dispatches_to_triton(channels_last):
    x = (_randn(2, 8, 5, 6, seed=10) * 2).float().to(DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = _randn(8, seed=11).float().to(DEVICE).requires_grad_(True)
    b = _randn(8, seed=12).float().to(DEVICE).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    with ops.use_backend("triton"):
        y = ops.group_norm_silu(xr, 4, w, b)
        grads = torch.autograd.grad(y, (xr, w, b), torch.ones_like(y))
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x64, w64, b64 = (t.detach().cpu().double().requires_grad_(True) for t in (x, w, b))
    ref, _, _ = group_norm_silu_reference(x64, 4, w64, b64)
    ref_grads = torch.autograd.grad(ref, (x64, w64, b64), torch.ones_like(ref))
    torch.testing.assert_close(y.detach().cpu().double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu().double(), rg, rtol=1e-4, atol=1e-4)
    with ops.use_backend("triton"):  # the fake (meta) outputs match what the Triton path returns
        torch.library.opcheck(torch.ops.fastdiff.group_norm_silu_fwd.default,
                              (x.flatten(2), w.detach(), b.detach(), 4, 1e-5, True),
                              test_utils=("test_schema", "test_faketensor"))


def test_attention_op_dispatches_to_triton():
    q, k, v = (_randn(1, 2, 12, 16, seed=s).float().to(DEVICE).requires_grad_(True) for s in (13, 14, 15))
    with ops.use_backend("triton"):
        out = ops.attention(q, k, v)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_(True) for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q64, k64, v64))
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu().double(), rg, rtol=1e-5, atol=1e-5)


def test_unet_sampling_on_the_triton_path(monkeypatch):
    """The whole GPU path at once: a U-Net whose GroupNorm+SiLU and attention run the Triton
    kernels, sampled with the per-step Triton step and with the table-driven loop of
    fastdiff.sampling.cuda_graphs (run without capture), against the reference backend."""
    import fastdiff
    from fastdiff.sampling import cuda_graphs

    torch.manual_seed(0)
    model = fastdiff.UNet.preset("tiny", image_size=8, model_channels=8, channel_mult=(1, 2), num_groups=4)
    model = model.to(DEVICE).eval()
    kwargs = dict(shape=(2, 3, 8, 8), steps=2, eta=0.5, seed=4, device=DEVICE)
    with ops.use_backend("reference"):
        want = fastdiff.sample(model, **kwargs)
    with ops.use_backend("triton"):
        got = fastdiff.sample(model, **kwargs)
        original = cuda_graphs.sample_loop
        monkeypatch.setattr(cuda_graphs, "sample_loop", lambda *a, **k: original(*a, **{**k, "_capture": False}))
        static = fastdiff.sample(model, cuda_graph=True, **kwargs)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(static, got, rtol=0, atol=0)


@pytest.mark.parametrize("variance_mode", [0, 1])
def test_sampler_step_in_place(variance_mode):
    x, out = _step_inputs(variance_mode, torch.float32)
    want = tk_step.sampler_step_triton(x, out, COEFS, 9, 3, 1, True, variance_mode)
    buffer = x.clone()
    got = tk_step.sampler_step_triton(buffer, out, COEFS, 9, 3, 1, True, variance_mode, out=buffer)
    assert got is buffer
    torch.testing.assert_close(buffer, want, rtol=0, atol=0)
    strided = torch.empty(x.shape[::-1], device=DEVICE).permute(3, 2, 1, 0)  # not contiguous: written by copy
    tk_step.sampler_step_triton(x, out, COEFS, 9, 3, 1, True, variance_mode, out=strided)
    torch.testing.assert_close(strided, want, rtol=0, atol=0)
    with ops.use_backend("triton"):  # through fastdiff::sampler_step_out
        buffer = x.clone()
        ops.sampler_step(buffer, out, ops.StepCoefficients(*COEFS), seed=9, step=3, sample_offset=1,
                         clip_denoised=True, variance=("fixed", "learned")[variance_mode], out=buffer)
    torch.testing.assert_close(buffer, want, rtol=0, atol=0)


# --------------------------------------------------------------------------- issue #18 §2 (items 2, 6)
def test_every_launcher_runs_on_its_tensors_device():
    """Triton and the CUDA C++ launchers launch on the *current* device: each public launcher
    makes its first tensor's device current (checked by construction without two GPUs)."""
    from fastdiff.triton_kernels import _common, cuda_native

    launchers = [tk_step.sampler_step_triton, tk_step.sampler_step_table_triton, tk_gn.group_norm_silu_fwd_triton,
                 tk_gn.group_norm_silu_bwd_triton, tk_attn.attention_fwd_triton, tk_attn.attention_bwd_triton,
                 cuda_native.sampler_step_cuda, cuda_native.sampler_step_table_cuda,
                 cuda_native.group_norm_silu_fwd_cuda, cuda_native.group_norm_silu_bwd_cuda]
    assert all(getattr(f, "device_guarded", False) for f in launchers)

    class _OnCuda1:
        device = torch.device("cuda", 1)

    guard = _common.device_guard(_OnCuda1())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_common.device_guard(torch.zeros(1)), torch.cuda.device)


def test_attention_grid_puts_batch_heads_on_the_unbounded_axis():
    assert tk_attn.grid(33, 16, 70000) == (70000, 3)  # B * H = 70,000 > 65,535
    with pytest.raises(ValueError, match="sequence length"):
        tk_attn.grid(65536 * 16 + 1, 16, 1)


@pytest.mark.parametrize("value", [0.1, -6.123456789012345, 1e-3 / 3, 12345.678901234567, 0.0, -1e-20])
def test_fp64_scalars_reach_triton_exactly(value):
    from fastdiff.triton_kernels._common import split_fp64
    import struct

    hi, lo, lo2 = split_fp64(value)
    for part in (hi, lo, lo2):
        assert struct.unpack("f", struct.pack("f", part))[0] == part  # each part is an fp32
    assert hi + lo + lo2 == value


def test_fp64_step_needs_no_host_to_device_copy(monkeypatch):
    """The fp64 per-step path used to build a (1, 7) coefficient tensor on the device per step
    (a host-to-device copy, illegal inside a CUDA-graph capture); its scalars now go as fp32 parts."""
    x = _randn(2, 3, 5, seed=20).to(DEVICE)
    out = _randn(2, 3, 5, seed=21).to(DEVICE)
    coefs = [1.0 + 1e-12, -0.3 + 1e-14, 0.45, 0.6 - 1e-13, 0.0, -6.0, -3.0]  # no noise: Philox is fp32
    want = sampler_step_reference(x, out, coefs, 5, 3, 0, False, 0)

    def no_tensor(*args, **kwargs):
        raise AssertionError("torch.tensor called on the per-step path")

    monkeypatch.setattr(tk_step.torch, "tensor", no_tensor)
    got = tk_step.sampler_step_triton(x, out, coefs, 5, 3, 0, False, 0)
    monkeypatch.undo()
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-13, atol=1e-13)


def test_table_step_with_zero_sigma_is_the_mean_and_index_is_clamped():
    x = _randn(2, 3, 5, seed=22).float().to(DEVICE)
    out = _randn(2, 3, 5, seed=23).float().to(DEVICE)
    rows = [[1.1, -0.2, 0.5, 0.4, 0.0, 0.0, 0.0], [0.9, -0.1, 0.3, 0.6, 0.2, 0.0, 0.0]]
    table = torch.tensor(rows, dtype=torch.float64, device=DEVICE)
    got = tk_step.sampler_step_table_triton(x, out, table, torch.tensor(0, device=DEVICE), 1, 0, False, 0)
    mean = 0.5 * (1.1 * x.double() - 0.2 * out.double()) + 0.4 * x.double()
    torch.testing.assert_close(got.double(), mean, rtol=1e-6, atol=1e-6)
    # an index outside [0, S) (a replay too many) reads the nearest row, never outside the table
    high = tk_step.sampler_step_table_triton(x, out, table, torch.tensor(5, device=DEVICE), 1, 0, False, 0)
    last = tk_step.sampler_step_table_triton(x, out, table, torch.tensor(1, device=DEVICE), 1, 0, False, 0)
    torch.testing.assert_close(high, last, rtol=0, atol=0)
    low = tk_step.sampler_step_table_triton(x, out, table, torch.tensor(-3, device=DEVICE), 1, 0, False, 0)
    torch.testing.assert_close(low, got, rtol=0, atol=0)


@pytest.mark.skipif(DEVICE.type != "cuda" or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_the_tensors_device_not_the_current_one():
    x = _randn(2, 4, 6, seed=30).float().to("cuda:1")
    out = _randn(2, 4, 6, seed=31).float().to("cuda:1")
    coefs = [1.0, -0.1, 0.5, 0.5, 0.2, 0.0, 0.0]
    with torch.cuda.device(0):
        got = tk_step.sampler_step_triton(x, out, coefs, 3, 1, 0, False, 0)
        y, _, _ = tk_gn.group_norm_silu_fwd_triton(x, None, None, 2, 1e-5, True)
    assert got.device == x.device
    torch.testing.assert_close(got.cpu().double(), sampler_step_reference(x.cpu().double(), out.cpu().double(),
                                                                          coefs, 3, 1, 0, False, 0),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.cpu().double(), group_norm_silu_reference(x.cpu().double(), 2)[0],
                               rtol=1e-5, atol=1e-5)
