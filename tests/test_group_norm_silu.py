"""fastdiff.ops.group_norm_silu: native CPU kernel against the float64 reference (itself
checked against torch.nn.functional), layouts, bf16, threads, registration, bad input."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff.ops import _backend, group_norm_silu, group_norm_silu_reference, use_backend
from fastdiff.ops import group_norm as gn_module
from native_harness import asan_build_and_run  # noqa: E402

native = pytest.mark.skipif(_backend.native_lib is None, reason="fastdiff._C not built")

# (shape, num_groups)
EDGE_CASES = [
    ((1, 1, 1, 1), 1),  # minimal
    ((2, 4, 1, 1), 2),  # 1x1 spatial
    ((2, 6, 5, 7), 3),  # odd spatial
    ((3, 8, 4, 4), 8),  # C = groups
    ((2, 8, 9, 3), 1),  # one group
    ((4, 64, 16, 16), 32),  # typical U-Net block
    ((2, 4, 70, 70), 2),  # a group spans several statistics chunks (> 4096 values)
    ((1, 1024, 3, 3), 32),  # wide: channels_last tasks hold few positions
    ((2, 12, 33), 4),  # (N, C, L)
    ((5, 24), 6),  # (N, C)
]
EDGE_IDS = [f"{'x'.join(map(str, s))}-g{g}" for s, g in EDGE_CASES]


def _inputs(shape, groups, dtype=torch.float32, channels_last=False, affine=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 2.0 + 0.5).to(dtype)
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    weight = (1.0 + 0.5 * torch.randn(c, generator=gen)).to(dtype) if affine else None
    bias = (0.5 * torch.randn(c, generator=gen)).to(dtype) if affine else None
    return x, weight, bias


def _f64(t):
    return None if t is None else t.detach().to(torch.float64)


def _reference_grads(x, groups, weight, bias, grad_y, act):
    """Forward and input/parameter gradients by autograd of the float64 reference."""
    leaves = [t.requires_grad_(True) for t in (_f64(x), _f64(weight), _f64(bias)) if t is not None]
    xr = leaves[0]
    wr, br = (leaves[1], leaves[2]) if weight is not None else (None, None)
    y, _, _ = group_norm_silu_reference(xr, groups, wr, br, 1e-5, act)
    grads = torch.autograd.grad(y, leaves, grad_y.to(torch.float64))
    return y.detach(), grads


def _grad_x_atol(x, groups):
    """fp32 dx = rstd * (a difference of O(|dy w|) terms): its rounding error grows with rstd,
    large for groups of 1-2 values or nearly constant groups. Scale the tolerance with it."""
    _, _, rstd = group_norm_silu_reference(_f64(x), groups, None, None, 1e-5, False)
    return 1e-5 * max(1.0, rstd.max().item())


def _native_grads(x, groups, weight, bias, grad_y, act):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias) if t is not None]  # keeps layout
    xn = leaves[0]
    wn, bn = (leaves[1], leaves[2]) if weight is not None else (None, None)
    with use_backend("native"):
        y = group_norm_silu(xn, groups, wn, bn, 1e-5, act)
        grads = torch.autograd.grad(y, leaves, grad_y)
    return y.detach(), grads


# --------------------------------------------------------------------------- reference
def test_reference_matches_torch_functional():
    x, w, b = _inputs((3, 12, 5, 6), 4)
    y, mean, rstd = group_norm_silu_reference(_f64(x), 4, _f64(w), _f64(b), 1e-5, True)
    expected = F.silu(F.group_norm(_f64(x), 4, _f64(w), _f64(b), 1e-5))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    xg = _f64(x).reshape(3, 4, -1)
    torch.testing.assert_close(mean, xg.mean(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rstd, (xg.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-12, atol=1e-12)


def test_gradcheck_reference_float64():
    x, w, b = (t.to(torch.float64).requires_grad_(True) for t in _inputs((2, 6, 3, 2), 3))
    with use_backend("reference"):
        assert torch.autograd.gradcheck(lambda x, w, b: group_norm_silu(x, 3, w, b), (x, w, b))
        assert torch.autograd.gradcheck(lambda x: group_norm_silu(x, 2, act=False), (x,))


# --------------------------------------------------------------------------- native fp32
@native
@pytest.mark.parametrize("shape,groups", EDGE_CASES, ids=EDGE_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("act", [True, False], ids=["silu", "noact"])
def test_native_forward_backward_fp32(shape, groups, channels_last, act):
    x, w, b = _inputs(shape, groups, channels_last=channels_last)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    y, grads = _native_grads(x, groups, w, b, grad_y, act)
    y_ref, grads_ref = _reference_grads(x, groups, w, b, grad_y, act)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(("x", "weight", "bias"), grads, grads_ref):
        # dweight/dbias sum over N * S values: scale the tolerance with the sum's size
        tol = _grad_x_atol(x, groups) if name == "x" else 1e-5 * max(1.0, g_ref.abs().max().item())
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=tol, msg=lambda m: f"grad {name}: {m}")


@native
def test_native_without_affine():
    x, _, _ = _inputs((2, 8, 5, 5), 4, affine=False)
    with use_backend("native"):
        y = group_norm_silu(x, 4)
    torch.testing.assert_close(y.double(), F.silu(F.group_norm(_f64(x), 4)), rtol=1e-5, atol=1e-5)


@native
def test_channels_last_stays_channels_last_without_copy():
    x, w, b = _inputs((2, 16, 6, 5), 4, channels_last=True)
    x3 = x.flatten(2)
    assert x3.data_ptr() == x.data_ptr()  # the op reads channels_last in place
    with use_backend("native"):
        y = group_norm_silu(x, 4, w, b)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert y.stride() == x.stride()


@native
@pytest.mark.parametrize("view", ["slice", "transpose", "expanded_weight"])
def test_non_contiguous_inputs(view):
    base, w, b = _inputs((2, 8, 10, 12), 4)
    if view == "slice":
        x = base[:, :, ::2, 1:]
    elif view == "transpose":
        x = base.transpose(2, 3)
    else:
        x = base
        w = torch.ones(1).expand(8)  # stride 0
    grad_y = torch.randn(x.shape)
    y, grads = _native_grads(x, 4, w, b, grad_y, True)
    y_ref, grads_ref = _reference_grads(x, 4, w, b, grad_y, True)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0].double(), grads_ref[0], rtol=1e-4, atol=1e-5)


@native
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_never_reads_past_the_tensor(channels_last):
    # x and grad_y are the first samples of buffers whose remainder is NaN, read in place:
    # a read past the end of x shows up as a NaN.
    buf, w, b = _inputs((5, 6, 7, 3), 3, channels_last=channels_last)
    grad_buf = torch.randn(buf.shape).contiguous(memory_format=buf.dim() == 4 and channels_last
                                                 and torch.channels_last or torch.contiguous_format)
    with torch.no_grad():
        buf[3:] = float("nan")
        grad_buf[3:] = float("nan")
    buf.requires_grad_(True)
    with use_backend("native"):
        y = group_norm_silu(buf[:3], 3, w, b)
        y.backward(grad_buf[:3])
    assert torch.isfinite(y).all()
    assert torch.isfinite(buf.grad[:3]).all() and (buf.grad[3:] == 0).all()


@native
@settings(max_examples=20, deadline=None, database=None)
@given(n=st.integers(1, 3), groups=st.integers(1, 4), per_group=st.integers(1, 5), h=st.integers(1, 9),
       w=st.integers(1, 9), channels_last=st.booleans(), act=st.booleans())
def test_native_matches_reference_hypothesis(n, groups, per_group, h, w, channels_last, act):
    shape = (n, groups * per_group, h, w)
    seed = n * 31 + h * 7 + w
    x, wt, b = _inputs(shape, groups, channels_last=channels_last, seed=seed)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    y, grads = _native_grads(x, groups, wt, b, grad_y, act)
    y_ref, grads_ref = _reference_grads(x, groups, wt, b, grad_y, act)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0].double(), grads_ref[0], rtol=1e-4, atol=_grad_x_atol(x, groups))


@native
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_thread_count_does_not_change_the_result(channels_last):
    x, w, b = _inputs((4, 32, 9, 9), 8, channels_last=channels_last)
    grad_y = torch.randn(x.shape)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, g1 = _native_grads(x, 8, w, b, grad_y, True)
        torch.set_num_threads(2)
        y2, g2 = _native_grads(x, 8, w, b, grad_y, True)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bf16
@native
@pytest.mark.parametrize("shape,groups", [((2, 32, 8, 8), 8), ((3, 6, 5, 7), 3), ((2, 64, 1, 1), 32)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bf16_as_accurate_as_torch(shape, groups, channels_last):
    """flash-attention's rule: max|kernel_bf16 - ref_fp32| <= 2 max|torch_bf16 - ref_fp32| + tiny."""
    x, w, b = _inputs(shape, groups, dtype=torch.bfloat16, channels_last=channels_last)
    grad_y = torch.randn(shape).to(torch.bfloat16)
    y, grads = _native_grads(x, groups, w, b, grad_y, True)
    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    y_ref, grads_ref = _reference_grads(x, groups, w, b, grad_y, True)  # float64 from the bf16 inputs

    xt, wt, bt = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y_torch = F.silu(F.group_norm(xt, groups, wt, bt, 1e-5))
    grads_torch = torch.autograd.grad(y_torch, (xt, wt, bt), grad_y)
    assert y_torch.dtype == torch.bfloat16

    def err(a, ref):
        return (a.double() - ref).abs().max().item()

    assert err(y, y_ref) <= 2 * err(y_torch, y_ref) + 1e-3
    for name, g, gt, gr in zip(("x", "weight", "bias"), grads, grads_torch, grads_ref):
        assert err(g, gr) <= 2 * err(gt, gr) + 1e-3 * max(1.0, gr.abs().max().item()), name


@native
def test_bf16_input_with_fp32_affine():
    x, w, b = _inputs((2, 8, 4, 4), 4, dtype=torch.bfloat16)
    w32, b32 = w.float().requires_grad_(True), b.float().requires_grad_(True)
    with use_backend("native"):
        y = group_norm_silu(x, 4, w32, b32)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and w32.grad.dtype == torch.float32
    ref = F.silu(F.group_norm(x.float(), 4, w32.detach(), b32.detach()))
    assert (y.float() - ref).abs().max() <= 2e-2


# --------------------------------------------------------------------------- registration
@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=native)])
def test_opcheck(backend):
    x, w, b = _inputs((2, 6, 3, 5), 3)
    x3 = x.flatten(2).requires_grad_(True)
    xcl, _, _ = _inputs((2, 6, 3, 5), 3, channels_last=True)
    xcl3 = xcl.flatten(2)
    with use_backend(backend):
        torch.library.opcheck(gn_module._group_norm_silu_fwd, (x3, w.requires_grad_(True), b, 3, 1e-5, True))
        torch.library.opcheck(gn_module._group_norm_silu_fwd, (xcl3, None, None, 3, 1e-5, False))
        y, mean, rstd = gn_module._group_norm_silu_fwd(x3.detach(), w.detach(), b, 3, 1e-5, True)
        torch.library.opcheck(gn_module._group_norm_silu_bwd,
                              (torch.randn_like(y), x3.detach(), w.detach(), b, mean, rstd, 3, 1e-5, True))


def test_float64_runs_the_reference():
    x, w, b = _inputs((2, 4, 3, 3), 2)
    y = group_norm_silu(_f64(x), 2, _f64(w), _f64(b))
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.silu(F.group_norm(_f64(x), 2, _f64(w), _f64(b))), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,error,match", [
    (lambda: group_norm_silu(torch.randn(2, 6, 4, 4), 4), ValueError, "num_groups.*C=6.*got 4"),
    (lambda: group_norm_silu(torch.randn(2, 6, 4, 4), 0), ValueError, "num_groups"),
    (lambda: group_norm_silu(torch.randn(2, 6, 4, 4), 2.0), TypeError, "num_groups must be an int"),
    (lambda: group_norm_silu(torch.randn(6), 2), ValueError, r"x must have shape .*got shape \(6,\)"),
    (lambda: group_norm_silu(torch.randn(0, 6, 4, 4), 2), ValueError, "x must not be empty"),
    (lambda: group_norm_silu(torch.ones(2, 6, 4, 4, dtype=torch.int32), 2), TypeError, "x must be a floating"),
    (lambda: group_norm_silu([1.0, 2.0], 1), TypeError, "x must be a torch.Tensor"),
    (lambda: group_norm_silu(torch.randn(2, 6, 4), 2, torch.ones(5)), ValueError, r"weight must have shape \(6,\)"),
    (lambda: group_norm_silu(torch.randn(2, 6, 4), 2, None, torch.ones(6, dtype=torch.float64)), TypeError,
     "bias dtype"),
    (lambda: group_norm_silu(torch.randn(2, 6, 4), 2, eps=-1.0), ValueError, "eps"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@native
def test_silu_saturates_for_extreme_activations():
    # weight 1e6 pushes z far past exp's range: silu(z) -> z above, -> 0 below, never NaN
    x, _, _ = _inputs((2, 4, 5, 5), 2)
    weight = torch.tensor([1e6, -1e6, 1e2, -1e2])
    bias = torch.tensor([0.0, 1.0, -50.0, 50.0])
    with use_backend("native"):
        y = group_norm_silu(x, 2, weight, bias)
    expected = group_norm_silu_reference(_f64(x), 2, _f64(weight), _f64(bias))[0]
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@native
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_nan_and_inf_poison_their_group_like_torch(channels_last):
    x, w, b = _inputs((2, 8, 4, 4), 4, channels_last=channels_last)
    with torch.no_grad():
        x[0, 0, 0, 0] = float("nan")
        x[1, 5, 1, 1] = float("inf")
    with use_backend("native"):
        y = group_norm_silu(x, 4, w, b)
    expected = F.silu(F.group_norm(x, 4, w, b))
    assert torch.equal(y.isnan(), expected.isnan())
    torch.testing.assert_close(y[~expected.isnan()], expected[~expected.isnan()], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bounds (ASan)
_BOUNDS_HARNESS = r"""
// Exact-size heap buffers (ASan redzones on both sides) for odd shapes, both layouts,
// fp32 and bf16, with and without SiLU, 1 and 2 threads.
#include <cstdio>
#include <cstdint>
#include <vector>
#include "cpu/group_norm_silu.h"
using namespace fastdiff;
template <typename T>
static void run(int64_t N, int64_t C, int64_t S, int64_t G, bool cl, bool act, int dtype, int threads) {
  const int64_t n = N * C * S;
  std::vector<T> x(n), dy(n), y(n), dx(n);
  for (int64_t i = 0; i < n; ++i) { x[i] = T((i * 37) % 11); dy[i] = T((i * 13) % 5); }
  if (dtype == kBFloat16)
    for (int64_t i = 0; i < n; ++i) { x[i] = T(0x3F80 + (i % 7)); dy[i] = T(0x3F00 + (i % 3)); }
  std::vector<float> w(C, 1.5f), b(C, 0.25f), mean(N * G), rstd(N * G), gw(C), gb(C);
  GroupNormArgs fa{x.data(), w.data(), b.data(), y.data(), mean.data(), rstd.data(), N, C, S, G, 1e-5, cl, act,
                   dtype, threads};
  group_norm_silu_forward_cpu(fa);
  GroupNormBackwardArgs ba{dy.data(), x.data(), w.data(), b.data(), mean.data(), rstd.data(), dx.data(),
                           gw.data(), gb.data(), N, C, S, G, cl, act, dtype, threads};
  group_norm_silu_backward_cpu(ba);
}
int main() {
  const int64_t shapes[][4] = {{1, 1, 1, 1}, {2, 6, 35, 3}, {3, 8, 1, 8}, {1, 1024, 9, 32},
                               {2, 4, 4900, 2}, {1, 3, 70000, 1}, {5, 24, 17, 6}};
  for (const auto& s : shapes)
    for (int cl = 0; cl < 2; ++cl)
      for (int act = 0; act < 2; ++act)
        for (int threads = 1; threads <= 2; ++threads) {
          run<float>(s[0], s[1], s[2], s[3], cl, act, kFloat32, threads);
          run<uint16_t>(s[0], s[1], s[2], s[3], cl, act, kBFloat16, threads);
        }
  std::printf("ok\n");
  return 0;
}
"""


def test_kernels_stay_in_bounds_under_asan(tmp_path):
    """The C++ kernels on exact-size buffers, built with AddressSanitizer + UBSan."""
    asan_build_and_run(tmp_path, _BOUNDS_HARNESS, ["csrc/cpu/group_norm_silu.cpp"])
