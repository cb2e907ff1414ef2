"""fastdiff.ops.sampler_step and the Philox noise stream: native kernel vs reference."""
import math

import pytest
import torch
from scipy import stats

from fastdiff import ops
from fastdiff.ops import StepCoefficients
from fastdiff.ops._backend import native_lib
from fastdiff.ops.philox import philox4x32_10

needs_native = pytest.mark.skipif(native_lib is None, reason="fastdiff._C not built")

COEFS = StepCoefficients(a1=1.3, a2=-0.7, c1=0.45, c2=0.6, sigma=0.3, min_log=-6.0, max_log=-3.0)


def _i64(v):
    return torch.tensor([v], dtype=torch.int64)


@pytest.mark.parametrize("counter, key, expected", [
    # Known-answer vectors of Random123 (Salmon et al., SC'11) for philox4x32_10.
    ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0x299F31D0 << 32) | 0xA4093822,
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    out = philox4x32_10(*[_i64(c) for c in counter], key)
    assert tuple(int(o) for o in out) == expected


def test_reference_noise_is_standard_normal():
    z = ops.philox_normal_reference(8, 25_000, seed=3, step=11).flatten().numpy()
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / z.size)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # neighbouring elements, samples and steps are uncorrelated
    a = ops.philox_normal_reference(1, 40_000, seed=3, step=11)[0]
    b = ops.philox_normal_reference(1, 40_000, seed=3, step=12)[0]
    assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1]) < 0.03
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.03


@needs_native
@pytest.mark.parametrize("numel", [1, 3, 4, 63, 64, 65, 4095, 4097, 3 * 32 * 32])
def test_native_noise_matches_reference(numel):
    ref = ops.philox_normal_reference(3, numel, seed=2**40 + 7, step=5, sample_offset=9)
    with ops.use_backend("native"):
        nat = ops.randn((3, numel), seed=2**40 + 7, step=5, sample_offset=9, dtype=torch.float64)
    # same integers; float32 log/sincos polynomials against float64 libm
    torch.testing.assert_close(nat, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native)])
def test_noise_batch_and_offset_invariance(backend):
    with ops.use_backend(backend):
        full = ops.randn((64, 3, 5, 7), seed=42, step=3)
        alone = ops.randn((1, 3, 5, 7), seed=42, step=3)
        tail = ops.randn((59, 3, 5, 7), seed=42, step=3, sample_offset=5)
    assert torch.equal(full[:1], alone)
    assert torch.equal(full[5:], tail)


@needs_native
def test_noise_independent_of_thread_count():
    torch.set_num_threads(1)
    one = ops.randn((16, 3, 32, 32), seed=1, step=2)
    torch.set_num_threads(2)
    two = ops.randn((16, 3, 32, 32), seed=1, step=2)
    assert torch.equal(one, two)


def _inputs(shape, dtype=torch.float32, learned=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    out_shape = (shape[0], 2 * shape[1], *shape[2:]) if learned else shape
    out = torch.randn(out_shape, generator=g, dtype=torch.float64)
    if learned:
        out[:, shape[1]:] = out[:, shape[1]:].tanh()  # variance channels in [-1, 1]
    return x, out.to(dtype)


CASES = [
    ((1, 1), "minimal"),
    ((2, 3), "odd, smaller than a quad"),
    ((5000, 2, 1), "many tiny samples per task"),
    ((3000, 3, 5, 5), "runs of samples, serial and parallel"),
    ((3, 3, 5, 7), "odd spatial"),
    ((2, 4, 33, 31), "crosses a noise block"),
    ((2, 3, 64, 70), "crosses a parallel chunk"),
    ((64, 3, 32, 32), "CIFAR batch"),
]


@needs_native
@pytest.mark.parametrize("shape, label", CASES, ids=[c[1] for c in CASES])
@pytest.mark.parametrize("variance", ["fixed", "learned", "learned_range"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_matches_reference(shape, label, variance, clip, dtype):
    if variance != "fixed" and len(shape) < 2:
        pytest.skip("learned variance needs a channel dimension")
    x, out = _inputs(shape, dtype, learned=variance != "fixed")
    if variance == "learned":
        out[:, shape[1]:] = out[:, shape[1]:] * 2 - 4  # log-variances around e^-4
    kw = dict(seed=123, step=7, sample_offset=2, clip_denoised=clip, variance=variance)
    with ops.use_backend("reference"):
        ref = ops.sampler_step(x, out, COEFS, **kw)
    with ops.use_backend("native"):
        nat = ops.sampler_step(x, out, COEFS, **kw)
    tol = 1e-5 if dtype == torch.float32 else 3e-6  # fp64: noise drawn in float32
    torch.testing.assert_close(nat, ref, rtol=tol, atol=tol)
    assert nat.dtype == dtype and nat.shape == x.shape


@needs_native
def test_zero_sigma_is_deterministic_affine():
    x, out = _inputs((4, 3, 9, 9))
    coefs = StepCoefficients(1.1, -0.2, 0.5, 0.4, 0.0)
    y = ops.sampler_step(x, out, coefs, seed=0, step=0)
    expected = 0.5 * (1.1 * x.double() - 0.2 * out.double()) + 0.4 * x.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)
    # a different seed or step changes nothing without noise
    assert torch.equal(y, ops.sampler_step(x, out, coefs, seed=5, step=9))


@needs_native
def test_bf16_computes_in_fp32():
    x, out = _inputs((2, 3, 8, 8), torch.bfloat16)
    with ops.use_backend("reference"):
        ref = ops.sampler_step(x.float(), out.float(), COEFS, seed=1, step=1)
    y = ops.sampler_step(x, out, COEFS, seed=1, step=1)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


@needs_native
def test_non_contiguous_and_channels_last_inputs():
    x, out = _inputs((4, 8, 6, 5))
    ref = ops.sampler_step(x, out, COEFS, seed=3, step=4)
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)
    out_cl = out.to(memory_format=torch.channels_last)
    assert not x_nc.is_contiguous() and not out_cl.is_contiguous()
    torch.testing.assert_close(ops.sampler_step(x_nc, out_cl, COEFS, seed=3, step=4), ref, rtol=0, atol=0)
    # the mean half of a learned-variance output, read in place through its batch stride
    wide = torch.cat([out, torch.randn_like(out)], dim=1)
    torch.testing.assert_close(ops.sampler_step(x, wide[:, :8], COEFS, seed=3, step=4), ref, rtol=0, atol=0)


@needs_native
def test_sampler_step_batch_invariance():
    x, out = _inputs((64, 3, 16, 16))
    full = ops.sampler_step(x, out, COEFS, seed=9, step=17)
    alone = ops.sampler_step(x[:1], out[:1], COEFS, seed=9, step=17)
    assert torch.equal(full[:1], alone)


@needs_native
def test_native_independent_of_thread_count():
    x, out = _inputs((8, 3, 32, 32))
    torch.set_num_threads(1)
    one = ops.sampler_step(x, out, COEFS, seed=2, step=3, clip_denoised=True)
    torch.set_num_threads(2)
    two = ops.sampler_step(x, out, COEFS, seed=2, step=3, clip_denoised=True)
    assert torch.equal(one, two)


def test_opcheck():
    x, out = _inputs((2, 3, 4, 4))
    from fastdiff.ops.sampler_step import _sampler_step_op
    torch.library.opcheck(_sampler_step_op, (x, out, COEFS.as_list(), 1, 2, 0, True, 0))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(out_shape=(2, 4, 4, 4)), ValueError, "model_output shape"),
    (dict(out_dtype=torch.float64), TypeError, "model_output dtype"),
    (dict(x_dtype=torch.int64), TypeError, "x_t must be a floating-point"),
    (dict(variance="learned"), ValueError, "mean channels then variance channels"),
    (dict(variance="bogus"), ValueError, "variance must be one of"),
    (dict(seed=-1), ValueError, "seed must be in"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(step=2**32), ValueError, "step must be in"),
    (dict(sample_offset=2**32 - 1), ValueError, "sample_offset \\+ batch"),
])
def test_bad_input(kwargs, exc, match):
    x = torch.zeros((2, 3, 4, 4), dtype=kwargs.pop("x_dtype", torch.float32))
    out = torch.zeros(kwargs.pop("out_shape", (2, 3, 4, 4)), dtype=kwargs.pop("out_dtype", x.dtype))
    call = dict(seed=0, step=0, sample_offset=0, variance="fixed")
    call.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.sampler_step(x, out, COEFS, **call)


def test_bad_coefs_and_backend():
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="coefs must be"):
        ops.sampler_step(x, x, [1, 2, 3], seed=0, step=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("cuda-magic"):
            pass


@needs_native
def test_device_mismatch_is_rejected():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="is on meta"):
        ops.sampler_step(x, torch.zeros(2, 3, device="meta"), COEFS, seed=0, step=0)


@needs_native
def test_compiles_without_graph_break():
    def step(x, out):
        return ops.sampler_step(x * 1.0, out, COEFS, seed=4, step=5) + 1.0

    x, out = _inputs((2, 3, 8, 8))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, out), step(x, out))


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native)])
def test_out_and_in_place(backend):
    x, out = _inputs((4, 3, 9, 9))
    with ops.use_backend(backend):
        expected = ops.sampler_step(x, out, COEFS, seed=6, step=2, clip_denoised=True)
        buf = torch.empty_like(x)
        assert ops.sampler_step(x, out, COEFS, seed=6, step=2, clip_denoised=True, out=buf) is buf
        torch.testing.assert_close(buf, expected, rtol=0, atol=0)
        x_in_place = x.clone()
        ops.sampler_step(x_in_place, out, COEFS, seed=6, step=2, clip_denoised=True, out=x_in_place)
        torch.testing.assert_close(x_in_place, expected, rtol=0, atol=0)
        strided = torch.empty(4, 3, 9, 18)[..., ::2]  # non-contiguous out: written through a copy
        ops.sampler_step(x, out, COEFS, seed=6, step=2, clip_denoised=True, out=strided)
        torch.testing.assert_close(strided, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out must be a tensor like x_t"):
        ops.sampler_step(x, out, COEFS, seed=6, step=2, out=torch.empty(4, 3, 9))
    with pytest.raises(ValueError, match="out must be a tensor like x_t"):
        ops.sampler_step(x, out, COEFS, seed=6, step=2, out=torch.empty_like(x, dtype=torch.float64))


def test_opcheck_out_variant():
    x, out = _inputs((2, 3, 4, 4))
    from fastdiff.ops.sampler_step import _sampler_step_out_op
    torch.library.opcheck(_sampler_step_out_op, (x, out, COEFS.as_list(), 1, 2, 0, True, 0, torch.empty_like(x)))


# --------------------------------------------------------------------------- issue #12, item 7
@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native)])
def test_out_partially_overlapping_an_input_is_refused(backend):
    """The native kernel returned wrong values (errors 1-16) for an `out` shifted by one element
    against x_t; torch's ops refuse such overlap, and so does sampler_step (exact aliases stay)."""
    buf = torch.randn(2, 3, 65, generator=torch.Generator().manual_seed(0))
    x, shifted = buf[:, :, :64], buf[:, :, 1:]
    eps = torch.randn(2, 3, 64)
    coefs = ops.StepCoefficients(1.1, -0.2, 0.5, 0.4, 0.3)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="out partially overlaps x_t"):
            ops.sampler_step(x, eps, coefs, seed=1, step=2, out=shifted)
        out_buf = torch.randn(2, 3, 65)
        with pytest.raises(ValueError, match="out partially overlaps model_output"):
            ops.sampler_step(x.clone(), out_buf[:, :, 1:], coefs, seed=1, step=2, out=out_buf[:, :, :64])
        with pytest.raises(ValueError, match="overlap itself"):
            ops.sampler_step(x.clone(), eps, coefs, seed=1, step=2, out=torch.zeros(1, 3, 64).expand(2, 3, 64))
        want = ops.sampler_step(x, eps, coefs, seed=1, step=2)
        in_place = x.clone()
        ops.sampler_step(in_place, eps, coefs, seed=1, step=2, out=in_place)  # an exact alias is fine
        into_eps = eps.clone()
        ops.sampler_step(x, into_eps, coefs, seed=1, step=2, out=into_eps)
    torch.testing.assert_close(in_place, want, rtol=0, atol=0)
    torch.testing.assert_close(into_eps, want, rtol=0, atol=0)
