"""The table-driven step op and the static-buffer / CUDA-graph sampling loop (fastdiff/sampling/cuda_graphs.py).

On CPU the loop runs without capture (the same Python logic the graph replays); with
FASTDIFF_TEST_DEVICE=cuda on a GPU machine the real capture is tested too.
"""
import math
import os

import pytest
import torch

import fastdiff
from fastdiff import ops
from fastdiff.sampling import cuda_graphs
from fastdiff.ops import StepCoefficients
from fastdiff.ops._backend import native_lib, triton_available
from fastdiff.ops.sampler_step import coefficient_table, sampler_step_table

DEVICE = torch.device(os.environ.get("FASTDIFF_TEST_DEVICE", "cpu"))
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda" or not torch.cuda.is_available(),
                                reason="needs FASTDIFF_TEST_DEVICE=cuda and a GPU")
CPU_BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(native_lib is None,
                                                                              reason="fastdiff._C not built"))]

COEFS = [StepCoefficients(1.3, -0.7, 0.45, 0.6, 0.3, -6.0, -3.0),
         StepCoefficients(1.1, -0.2, 0.5, 0.4, 0.0, -5.0, -2.0),  # sigma = 0: no noise
         StepCoefficients(2.0, -1.5, 0.3, 0.7, 0.8, -4.0, -1.0)]


def _inputs(variance, batch=3, shape=(4, 5, 6), dtype=torch.float64, device=DEVICE):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn((batch, *shape), generator=gen, dtype=dtype)
    channels = shape[0] * (2 if variance != "fixed" else 1)
    out = torch.randn((batch, channels, *shape[1:]), generator=gen, dtype=dtype)
    if variance == "learned_range":
        out[:, shape[0]:] = out[:, shape[0]:].clamp(-1, 1)
    return x.to(device), out.to(device)


# --------------------------------------------------------------------------- the table op
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variance", ["fixed", "learned", "learned_range"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_table_step_equals_per_step_op(backend, variance, index):
    x, out = _inputs(variance, device="cpu")
    table = coefficient_table(COEFS)
    with ops.use_backend(backend):
        got = sampler_step_table(x, out, table, torch.tensor(index), seed=2**35 + 1, sample_offset=4,
                                 clip_denoised=True, variance=variance)
        want = ops.sampler_step(x, out, COEFS[index], seed=2**35 + 1, step=index, sample_offset=4,
                                clip_denoised=True, variance=variance)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if COEFS[index].sigma:  # the index also selects the noise step
        with ops.use_backend(backend):
            other = ops.sampler_step(x, out, COEFS[index], seed=2**35 + 1, step=index + 1, sample_offset=4,
                                     clip_denoised=True, variance=variance)
        assert not torch.equal(got, other)


def test_coefficient_table_layout():
    table = coefficient_table(COEFS)
    assert table.dtype == torch.float64 and table.shape == (3, 7)
    assert table[2].tolist() == [2.0, -1.5, 0.3, 0.7, 0.8, -4.0, -1.0]


@pytest.mark.parametrize("bad, match", [
    (dict(coef_table=torch.zeros(3, 6, dtype=torch.float64)), "coef_table"),
    (dict(coef_table=torch.zeros(3, 7, dtype=torch.float32)), "coef_table"),
    (dict(step_index=torch.tensor([1])), "step_index"),
    (dict(step_index=torch.tensor(1, dtype=torch.int32)), "step_index"),
])
def test_table_op_rejects_bad_arguments(bad, match):
    x, out = _inputs("fixed", device="cpu")
    args = dict(coef_table=coefficient_table(COEFS), step_index=torch.tensor(0))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        sampler_step_table(x, out, args["coef_table"], args["step_index"], seed=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_table_op_checks_index_on_host_paths(backend):
    x, out = _inputs("fixed", device="cpu")
    with ops.use_backend(backend), pytest.raises(IndexError, match="step_index 3"):
        sampler_step_table(x, out, coefficient_table(COEFS), torch.tensor(3), seed=0)


def test_table_op_registration():
    x, out = _inputs("learned", dtype=torch.float32, device="cpu")
    torch.library.opcheck(torch.ops.fastdiff.sampler_step_table.default,
                          (x, out, coefficient_table(COEFS), torch.tensor(2), 5, 1, True, 1))


# --------------------------------------------------------------------------- the loop
class _ToyModel(torch.nn.Module):
    """A fixed nonlinear map of (x, t) that depends on t and on keyword args; 2C channels
    for a learned variance (second half in [-1, 1])."""

    def __init__(self, learned: bool = False):
        super().__init__()
        self.learned = learned
        self.calls = []

    def forward(self, x, t, shift=None):
        self.calls.append(t.clone())
        tt = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) / 1000.0
        eps = torch.sin(3 * x) * (0.5 + tt) + 0.1 * x
        if shift is not None:
            eps = eps + shift
        if self.learned:
            return torch.cat([eps, torch.tanh(x + tt)], dim=1)
        return eps


def _fake_capture(monkeypatch):
    original = cuda_graphs.sample_loop
    monkeypatch.setattr(cuda_graphs, "sample_loop", lambda *a, **k: original(*a, **{**k, "_capture": False}))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sampler, eta, variance", [
    ("ddim", 0.0, "fixed_small"),            # deterministic
    ("ddim", 0.7, "fixed_small"),            # noise every step but the last
    ("ddpm", 0.0, "fixed_large"),
    ("ddpm", 0.0, "learned_range"),          # variance channels read by the kernel
    ("ddim", 0.5, "learned"),                # DDIM gets the mean channels only
])
def test_static_loop_equals_plain_loop(monkeypatch, backend, sampler, eta, variance):
    _fake_capture(monkeypatch)
    d = fastdiff.GaussianDiffusion(fastdiff.NoiseSchedule.linear(200), variance=variance,
                                  loss="hybrid" if variance.startswith("learned") else "simple")
    kwargs = dict(shape=(3, 2, 4, 4), steps=7, eta=eta, diffusion=d, seed=11, sampler=sampler, sample_offset=2)
    with ops.use_backend(backend):
        plain_model, graph_model = _ToyModel(d.learned_variance), _ToyModel(d.learned_variance)
        plain = fastdiff.sample(plain_model, **kwargs)
        static = fastdiff.sample(graph_model, cuda_graph=True, **kwargs)
    torch.testing.assert_close(static, plain, rtol=0, atol=0)
    # the model saw the same original timesteps, highest first
    assert len(graph_model.calls) == 7
    for a, b in zip(graph_model.calls, plain_model.calls):
        assert torch.equal(a, b) and a.shape == (3,)
    assert plain_model.calls[0][0].item() == 199 and plain_model.calls[-1][0].item() == 0


def test_static_loop_passes_model_kwargs_and_x_T(monkeypatch):
    _fake_capture(monkeypatch)
    d = fastdiff.GaussianDiffusion(fastdiff.NoiseSchedule.cosine(100))
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    shift = torch.full((2, 3, 4, 4), 0.25)
    kwargs = dict(steps=5, diffusion=d, x_T=x_T, model_kwargs={"shift": shift}, eta=0.3)
    plain = fastdiff.sample(_ToyModel(), **kwargs)
    static = fastdiff.sample(_ToyModel(), cuda_graph=True, **kwargs)
    torch.testing.assert_close(static, plain, rtol=0, atol=0)
    assert not torch.equal(plain, fastdiff.sample(_ToyModel(), steps=5, diffusion=d, x_T=x_T, eta=0.3))


def test_static_loop_with_unet(monkeypatch):
    _fake_capture(monkeypatch)
    torch.manual_seed(0)
    model = fastdiff.UNet.preset("tiny", image_size=8).eval()
    kwargs = dict(shape=(2, 3, 8, 8), steps=3, seed=5)
    plain = fastdiff.sample(model, **kwargs)
    static = fastdiff.sample(model, cuda_graph=True, **kwargs)
    torch.testing.assert_close(static, plain, rtol=0, atol=0)


def test_cuda_graph_on_cpu_raises():
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA tensors"):
        fastdiff.sample(_ToyModel(), shape=(1, 2, 2, 2), steps=2, cuda_graph=True, device="cpu")


def test_compile_route_uses_torch_compile_mode(monkeypatch):
    seen = []

    def fake_compile(model, mode=None, **kw):
        seen.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    kwargs = dict(shape=(2, 2, 3, 3), steps=4, seed=3, eta=0.5)
    plain = fastdiff.sample(_ToyModel(), **kwargs)
    compiled = fastdiff.sample(_ToyModel(), compile="reduce-overhead", **kwargs)
    assert seen == ["reduce-overhead"]
    torch.testing.assert_close(compiled, plain, rtol=0, atol=0)


@pytest.mark.parametrize("kw, match", [
    (dict(compile="fast"), "compile must be"),
    (dict(compile="default", cuda_graph=True), "choose one"),
])
def test_bad_loop_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        fastdiff.sample(_ToyModel(), shape=(1, 2, 2, 2), steps=2, **kw)


# --------------------------------------------------------------------------- real capture (GPU)
@needs_cuda
@pytest.mark.skipif(not triton_available(), reason="capture needs the Triton step kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_capture_equals_plain_loop(dtype):
    torch.manual_seed(0)
    model = fastdiff.UNet.preset("tiny", image_size=16).to(DEVICE, dtype).eval()
    kwargs = dict(shape=(4, 3, 16, 16), steps=10, seed=9, eta=0.5, device=DEVICE, dtype=dtype)
    plain = fastdiff.sample(model, **kwargs)
    graphed = fastdiff.sample(model, cuda_graph=True, **kwargs)
    again = fastdiff.sample(model, cuda_graph=True, **kwargs)  # cached graph, replayed from reloaded buffers
    # The per-step and table kernels compute the same thing; the model is the same launches
    # (cuDNN may pick other algorithms under capture, hence a tolerance, not equality).
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(graphed.float(), plain.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(again, graphed, rtol=0, atol=0)
    # No host synchronisation inside the loop: replays of the cached graph under sync-debug "error".
    torch.cuda.set_sync_debug_mode("error")
    try:
        loop = next(iter(cuda_graphs._cache[model].values()))
        for _ in range(3):
            loop.graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(graphed.float().abs().max().item())


def test_captured_loops_are_cached_per_model_and_shape():
    import gc

    model = _ToyModel()
    settings = dict(seed=0, sample_offset=0, clip_denoised=True, variance="fixed", mean_only=False, model_kwargs={},
                    split_output=None, capture=True)
    x = torch.zeros(2, 3, 4, 4)
    a = cuda_graphs._loop_for(model, x, 5, ("k",), **settings)
    assert cuda_graphs._loop_for(model, x, 5, ("k",), **settings) is a
    assert cuda_graphs._loop_for(model, torch.zeros(3, 3, 4, 4), 5, ("k",), **settings) is not a
    assert cuda_graphs._loop_for(model, x.half(), 5, ("k",), **settings) is not a
    assert cuda_graphs._loop_for(model, x, 5, ("other settings",), **settings) is not a
    assert cuda_graphs._loop_for(model, x, 5, ("k",), **{**settings, "capture": False}) is not a  # never cached
    assert len(cuda_graphs._cache[model]) == 4
    del model, a
    gc.collect()
    assert len(cuda_graphs._cache) == 0  # the loops hold their model weakly: no leak through the cache


# --------------------------------------------------------------------------- issue #18 §2, items 1 and 5
def _settings(capture=True):
    return dict(seed=0, sample_offset=0, clip_denoised=True, variance="fixed", mean_only=False, model_kwargs={},
                split_output=lambda out, x: (out, None), capture=capture)


def test_step_index_restored_after_a_run_and_never_out_of_range():
    """A replay after `run()` used to read step index -1, -2, ... (index_select with a negative
    index, coef_table[-k] in the kernel); the index now wraps back to S-1."""
    model = _ToyModel()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    coefs = [StepCoefficients(1.0, -0.1, 0.5, 0.5, 0.0)] * 4
    loop = cuda_graphs._StaticLoop(model, x, 4, **_settings(capture=False))
    loop.load(x, torch.tensor([0, 10, 20, 30]), coefficient_table(coefs))
    loop.run(4)
    assert int(loop.step_index) == 3
    seen = []
    for _ in range(6):  # replays beyond the run
        loop.step()
        seen.append(int(loop.step_index))
    assert all(0 <= i < 4 for i in seen)
    assert [int(t[0]) for t in model.calls[4:]] == [30, 20, 10, 0, 30, 20]


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t):
        return self.lin(x)


def test_graph_cache_follows_parameter_storage():
    """A cached graph reads parameters by address: after model.half(); model.float() or
    load_state_dict(assign=True) it must not be reused (it would read freed memory)."""
    model = _Net()
    x = torch.zeros(2, 3, 4, 4)
    a = cuda_graphs._loop_for(model, x, 5, ("k",), **_settings())
    assert cuda_graphs._loop_for(model, x, 5, ("k",), **_settings()) is a
    model.half()
    model.float()
    b = cuda_graphs._loop_for(model, x, 5, ("k",), **_settings())
    assert b is not a and len(cuda_graphs._cache[model]) == 1  # the stale graph is dropped
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    c = cuda_graphs._loop_for(model, x, 5, ("k",), **_settings())
    assert c is not b and len(cuda_graphs._cache[model]) == 1
    with torch.no_grad():  # in-place updates keep the addresses: the graph stays valid
        model.lin.weight.add_(1.0)
    assert cuda_graphs._loop_for(model, x, 5, ("k",), **_settings()) is c


def test_graph_cache_is_bounded_per_model():
    model = _Net()
    x = torch.zeros(2, 3, 4, 4)
    loops = [cuda_graphs._loop_for(model, x, 5, (f"kwargs {i}",), **_settings()) for i in range(10)]
    assert len(cuda_graphs._cache[model]) == cuda_graphs.MAX_LOOPS_PER_MODEL
    assert cuda_graphs._loop_for(model, x, 5, ("kwargs 9",), **_settings()) is loops[9]  # recent ones kept
    assert cuda_graphs._loop_for(model, x, 5, ("kwargs 0",), **_settings()) is not loops[0]  # oldest evicted
