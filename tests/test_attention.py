"""fastdiff.ops.attention: native flash-style CPU kernel against the float64 reference
(itself checked against torch's SDPA), tails of blocks, strides, bf16, threads,
registration, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff.ops import _backend, attention, attention_reference, use_backend
from fastdiff.ops.attention import _attention_bwd, _attention_fwd, attention_backward_reference
from native_harness import asan_build_and_run  # noqa: E402

native = pytest.mark.skipif(_backend.native_lib is None, reason="fastdiff._C not built")

# (B, H, Lq, Lk, D); the kernel's blocks are 64 queries x 64 keys
EDGE_CASES = [
    (1, 1, 1, 1, 8),  # minimal
    (2, 2, 64, 64, 8),  # exactly one block, head dim 8
    (2, 3, 65, 65, 64),  # one past a block
    (1, 2, 17, 130, 256),  # head dim 256, Lq != Lk, key tail of 2
    (1, 1, 200, 3, 16),  # fewer keys than a block
    (2, 1, 1, 300, 32),  # L = 1 query
    (1, 2, 70, 45, 13),  # head dim not a power of two
    (1, 1, 33, 97, 100),  # head dim 100 (padded to 128 in the kernel)
]
EDGE_IDS = ["x".join(map(str, c)) for c in EDGE_CASES]


def _qkv(b, h, lq, lk, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen).to(dtype)
    k = torch.randn(b, h, lk, d, generator=gen).to(dtype)
    v = torch.randn(b, h, lk, d, generator=gen).to(dtype)
    return q, k, v


#: the CPU kernels: fastdiff's own (native) and ATen's flash kernel (aten, the CPU default)
CPU_KERNELS = [pytest.param("native", marks=native), "aten"]


def _kernel_out_and_grads(q, k, v, grad_out, scale=None, backend="native"):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with use_backend(backend):
        out = attention(*leaves, scale=scale)
        grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


def _reference_out_and_grads(q, k, v, grad_out, scale=None):
    leaves = [t.detach().to(torch.float64).requires_grad_(True) for t in (q, k, v)]
    out, _ = attention_reference(*leaves, scale)
    grads = torch.autograd.grad(out, leaves, grad_out.to(torch.float64))
    return out.detach(), grads


# --------------------------------------------------------------------------- reference
def test_reference_matches_sdpa():
    q, k, v = (t.double() for t in _qkv(2, 3, 20, 31, 16))
    out, lse = attention_reference(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 4.0, dim=-1), rtol=1e-12, atol=1e-12)


def test_gradcheck_reference_float64():
    q, k, v = (t.double().requires_grad_(True) for t in _qkv(1, 2, 5, 7, 8))
    with use_backend("reference"):
        assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, scale=0.7), (q, k, v))


def test_backward_reference_matches_autograd():
    q, k, v = (t.double() for t in _qkv(2, 2, 9, 11, 8))
    grad_out = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    out, lse = attention_reference(q, k, v, 0.3)
    expected = _reference_out_and_grads(q, k, v, grad_out, 0.3)[1]
    for g, e in zip(attention_backward_reference(grad_out, q, k, v, out, lse, 0.3), expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- native fp32
@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("shape", EDGE_CASES, ids=EDGE_IDS)
def test_cpu_forward_backward_fp32(shape, backend):
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, lq, lk, d)
    grad_out = torch.randn(b, h, lq, d, generator=torch.Generator().manual_seed(1))
    out, grads = _kernel_out_and_grads(q, k, v, grad_out, backend=backend)
    out_ref, grads_ref = _reference_out_and_grads(q, k, v, grad_out)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=2e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_cpu_lse_is_the_log_sum_exp(backend):
    q, k, v = _qkv(2, 2, 70, 130, 32)
    with use_backend(backend):
        _, lse = _attention_fwd(q, k, v, 0.25)
    expected = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * 0.25, dim=-1)
    torch.testing.assert_close(lse.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("scale", [0.01, 1.0, 3.0])
def test_cpu_explicit_scale(scale, backend):
    q, k, v = _qkv(1, 2, 40, 90, 24)
    grad_out = torch.randn(1, 2, 40, 24)
    out, grads = _kernel_out_and_grads(q, k, v, grad_out, scale, backend=backend)
    out_ref, grads_ref = _reference_out_and_grads(q, k, v, grad_out, scale)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-4 * max(1.0, scale))


@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("layout", ["blhd", "head_dim_strided", "expanded_kv"])
def test_non_contiguous_inputs(layout, backend):
    b, h, l, d = 2, 3, 40, 16
    gen = torch.Generator().manual_seed(3)
    if layout == "blhd":  # (B, L, H, D) storage, as a token-major projection gives
        q, k, v = (torch.randn(b, l, h, d, generator=gen).transpose(1, 2) for _ in range(3))
    elif layout == "head_dim_strided":  # head dim not dense: copied first
        q, k, v = (torch.randn(b, h, d, l, generator=gen).transpose(2, 3) for _ in range(3))
    else:  # one key/value head broadcast over H (stride 0)
        q = torch.randn(b, h, l, d, generator=gen)
        k, v = (torch.randn(b, 1, l, d, generator=gen).expand(b, h, l, d) for _ in range(2))
    grad_out = torch.randn(b, h, l, d, generator=gen).transpose(2, 3).contiguous().transpose(2, 3)
    out, grads = _kernel_out_and_grads(q, k, v, grad_out, backend=backend)
    out_ref, grads_ref = _reference_out_and_grads(q, k, v, grad_out)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=2e-5)


@native
def test_never_reads_past_the_tensors():
    # q, k, v, dO are views of NaN-filled buffers: longer rows (head dim), more positions
    # and more heads than the views cover. Any read outside the views turns up as NaN.
    b, h, lq, lk, d = 2, 2, 67, 131, 24

    def view(l):
        buf = torch.full((b, h + 1, l + 5, d + 8), float("nan"))
        inner = buf[:, :h, :l, :d]
        inner.copy_(torch.randn(b, h, l, d))
        return inner

    q, k, v, grad_out = view(lq), view(lk), view(lk), view(lq)
    with use_backend("native"):
        out, lse = _attention_fwd(q, k, v, 0.2)
        grads = _attention_bwd(grad_out, q, k, v, out, lse, 0.2)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert all(torch.isfinite(g).all() for g in grads)


@native
@settings(max_examples=15, deadline=None, database=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), lq=st.integers(1, 140), lk=st.integers(1, 140),
       d=st.integers(8, 80))
def test_native_matches_reference_hypothesis(b, h, lq, lk, d):
    q, k, v = _qkv(b, h, lq, lk, d, seed=lq * 131 + lk)
    grad_out = torch.randn(b, h, lq, d, generator=torch.Generator().manual_seed(d))
    out, grads = _kernel_out_and_grads(q, k, v, grad_out)
    out_ref, grads_ref = _reference_out_and_grads(q, k, v, grad_out)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=2e-5)


@native
def test_thread_count_does_not_change_the_result():
    q, k, v = _qkv(2, 3, 130, 100, 32)
    grad_out = torch.randn(2, 3, 130, 32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, g1 = _kernel_out_and_grads(q, k, v, grad_out)
        torch.set_num_threads(2)
        out2, g2 = _kernel_out_and_grads(q, k, v, grad_out)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(out1, out2, rtol=1e-6, atol=1e-6)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("shape", [(2, 2, 100, 100, 64), (1, 4, 64, 130, 8), (1, 1, 50, 70, 256)],
                         ids=["d64", "d8", "d256"])
def test_bf16_as_accurate_as_torch(shape, backend):
    """flash-attention's rule: max|kernel_bf16 - ref_fp32| <= 2 max|torch_bf16 - ref_fp32| + tiny."""
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, lq, lk, d, dtype=torch.bfloat16)
    grad_out = torch.randn(b, h, lq, d).to(torch.bfloat16)
    out, grads = _kernel_out_and_grads(q, k, v, grad_out, backend=backend)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    out_ref, grads_ref = _reference_out_and_grads(q, k, v, grad_out)  # float64 from the bf16 inputs

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out_torch = F.scaled_dot_product_attention(*leaves)
    grads_torch = torch.autograd.grad(out_torch, leaves, grad_out)

    def err(a, ref):
        return (a.double() - ref).abs().max().item()

    assert err(out, out_ref) <= 2 * err(out_torch, out_ref) + 1e-4
    for name, g, gt, gr in zip("qkv", grads, grads_torch, grads_ref):
        assert err(g, gr) <= 2 * err(gt, gr) + 1e-4, name


# --------------------------------------------------------------------------- registration
@pytest.mark.parametrize("backend", ["reference", *CPU_KERNELS])
def test_opcheck(backend):
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 2, 9, 13, 8))
    with use_backend(backend):
        torch.library.opcheck(_attention_fwd, (q, k, v, 0.35))
        out, lse = _attention_fwd(q.detach(), k.detach(), v.detach(), 0.35)
        torch.library.opcheck(_attention_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                                               0.35))


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = _qkv(1, 1, 6, 6, 16)
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, scale=1.0 / math.sqrt(16)))


# --------------------------------------------------------------------------- bad input
def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("call,error,match", [
    (lambda: attention(_t(2, 8, 8), _t(2, 8, 8), _t(2, 8, 8)), ValueError, r"q must have shape \(B, H, L, D\)"),
    (lambda: attention(_t(1, 1, 4, 8), _t(1, 1, 5, 8), _t(1, 1, 6, 8)), ValueError, "k shape .* must equal v shape"),
    (lambda: attention(_t(1, 2, 4, 8), _t(1, 1, 4, 8), _t(1, 1, 4, 8)), ValueError, "must agree in B, H and D"),
    (lambda: attention(_t(1, 1, 4, 8), _t(1, 1, 4, 16), _t(1, 1, 4, 16)), ValueError, "must agree in B, H and D"),
    (lambda: attention(_t(1, 1, 4, 8), _t(1, 1, 4, 8, dtype=torch.float64), _t(1, 1, 4, 8)), TypeError,
     "k dtype torch.float64 does not match q dtype torch.float32"),
    (lambda: attention(_t(1, 1, 4, 4), _t(1, 1, 4, 4), _t(1, 1, 4, 4)), ValueError, r"head dim D=4 .* \[8, 256\]"),
    (lambda: attention(_t(1, 1, 4, 264), _t(1, 1, 4, 264), _t(1, 1, 4, 264)), ValueError, "head dim D=264"),
    (lambda: attention(_t(1, 1, 0, 8), _t(1, 1, 4, 8), _t(1, 1, 4, 8)), ValueError, "q must not be empty"),
    (lambda: attention(_t(1, 1, 4, 8), _t(1, 1, 4, 8), torch.ones(1, 1, 4, 8, dtype=torch.int64)), TypeError,
     "v must be a floating"),
    (lambda: attention(_t(1, 1, 4, 8), _t(1, 1, 4, 8), _t(1, 1, 4, 8), scale=float("nan")), ValueError, "scale"),
    (lambda: attention(_t(1, 1, 4, 8), "k", _t(1, 1, 4, 8)), TypeError, "k must be a torch.Tensor"),
    (lambda: attention(_t(1, 1, 4, 8), _t(1, 1, 4, 8).to("meta"), _t(1, 1, 4, 8)), ValueError,
     "k is on meta but q is on cpu"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@native
def test_nan_and_inf_propagate_like_sdpa():
    q, k, v = _qkv(1, 2, 70, 70, 16)
    q[0, 0, 3, 2] = float("nan")  # one query row
    k[0, 1, 5, 0] = float("inf")  # one key: every score of head 1 is +-inf or nan
    with use_backend("native"):
        out = attention(q, k, v)
    expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out[~expected.isnan()], expected[~expected.isnan()], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bounds (ASan)
_BOUNDS_HARNESS = r"""
// Exact-size heap buffers (ASan redzones) for lengths around the 64-row blocks, every
// compiled head dim and padded ones, Lq != Lk, fp32 (K/V read in place on full blocks)
// and bf16, 1 and 2 threads; q/k/v/dO strided inside exact-size buffers as well.
#include <cstdio>
#include <cstdint>
#include <vector>
#include "cpu/attention.h"
#include "cpu/group_norm_silu.h"
using namespace fastdiff;
template <typename T>
static void run(int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, int64_t pad, int dtype, int threads) {
  const int64_t row = D + pad;  // row stride: head dim dense, rows padded by `pad`
  std::vector<T> q(B * H * Lq * row), k(B * H * Lk * row), v(B * H * Lk * row), go(B * H * Lq * row);
  for (size_t i = 0; i < q.size(); ++i) q[i] = T(dtype ? 0x3F80 + i % 5 : (i % 7) * 0.1f);
  for (size_t i = 0; i < k.size(); ++i) { k[i] = T(dtype ? 0x3F00 + i % 3 : (i % 5) * 0.2f); v[i] = k[i]; }
  for (size_t i = 0; i < go.size(); ++i) go[i] = q[i];
  std::vector<T> out(B * H * Lq * D), gq(B * H * Lq * D), gk(B * H * Lk * D), gv(B * H * Lk * D);
  std::vector<float> lse(B * H * Lq);
  AttentionArgs fa{q.data(), k.data(), v.data(), out.data(), lse.data(), B, H, Lq, Lk, D,
                   {H * Lq * row, Lq * row, row}, {H * Lk * row, Lk * row, row}, {H * Lk * row, Lk * row, row},
                   0.3f, dtype, threads};
  attention_forward_cpu(fa);
  AttentionBackwardArgs ba{go.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), gq.data(), gk.data(),
                           gv.data(), B, H, Lq, Lk, D, {H * Lq * row, Lq * row, row},
                           {H * Lq * row, Lq * row, row}, {H * Lk * row, Lk * row, row},
                           {H * Lk * row, Lk * row, row}, 0.3f, dtype, threads};
  attention_backward_cpu(ba);
}
int main() {
  const int64_t cases[][5] = {{1, 1, 1, 1, 8}, {1, 2, 64, 64, 64}, {2, 1, 65, 63, 16}, {1, 1, 130, 129, 256},
                              {1, 3, 7, 200, 13}, {1, 1, 128, 64, 100}, {2, 2, 33, 1, 32}, {1, 1, 64, 192, 128}};
  for (const auto& c : cases)
    for (int64_t pad : {0, 3})
      for (int threads = 1; threads <= 2; ++threads) {
        run<float>(c[0], c[1], c[2], c[3], c[4], pad, kFloat32, threads);
        run<uint16_t>(c[0], c[1], c[2], c[3], c[4], pad, kBFloat16, threads);
      }
  std::printf("ok\n");
  return 0;
}
"""


def test_kernels_stay_in_bounds_under_asan(tmp_path):
    """The C++ kernels on exact-size buffers, built with AddressSanitizer + UBSan."""
    asan_build_and_run(tmp_path, _BOUNDS_HARNESS, ["csrc/cpu/attention.cpp", "csrc/cpu/group_norm_silu.cpp"])


# --------------------------------------------------------------------------- issue #12, item 8
@native
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_native_keeps_nan_and_inf_keys(bad):
    """Compiled with finite-math-only, the kernel used to drop a NaN/inf key (finite output where
    the exact softmax and SDPA are NaN)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=gen) for _ in range(3))
    k[0, 1, 67, 3] = bad
    with use_backend("native"):
        out = attention(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.isnan(out[0, 1]).any() and torch.isfinite(out[0, 0]).all()
    torch.testing.assert_close(out[0, 0].double(), want[0, 0], rtol=1e-4, atol=1e-5)


@native
def test_native_exact_when_every_score_is_below_the_old_placeholder():
    """Scores around -2.8e32 (all below the kernel's old -1e30 running-max start): the exact
    answer is the mean of v (equal scores); the kernel returned NaN."""
    q = torch.full((1, 1, 5, 8), 1e16)
    k = torch.full((1, 1, 9, 8), -1e16)
    v = torch.randn(1, 1, 9, 8, generator=torch.Generator().manual_seed(1))
    with use_backend("native"):
        out = attention(q, k, v)
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand(1, 1, 5, 8), rtol=1e-5, atol=1e-6)


def test_reference_is_accurate_at_large_logits():
    """The reference (fallback path and ground truth) computed exp(scores - lse) in the input dtype:
    fp32 all-equal scores of ~2.8e8 gave an error of 2.79, bf16 at |score| ~ 1000 an error of 2.51."""
    v = torch.randn(1, 1, 16, 8, generator=torch.Generator().manual_seed(2))
    a = (2.8e8 * math.sqrt(8) / 8) ** 0.5
    q = torch.full((1, 1, 3, 8), a)
    out, _ = attention_reference(q, q[:, :, :1].expand(1, 1, 16, 8), v)
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand(1, 1, 3, 8), rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(3)
    qb = (torch.randn(1, 2, 8, 16, generator=gen) * 12).bfloat16()
    kb = (torch.randn(1, 2, 32, 16, generator=gen) * 12).bfloat16()
    vb = torch.randn(1, 2, 32, 16, generator=gen).bfloat16()
    got, _ = attention_reference(qb, kb, vb)
    exact, _ = attention_reference(qb.double(), kb.double(), vb.double())
    assert (got.double() - exact).abs().max() <= 2 * 2 ** -8 * exact.abs().max()  # bf16 rounding of the output
