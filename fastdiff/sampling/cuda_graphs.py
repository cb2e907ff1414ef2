"""Sampling with the whole step (model call + fused step) captured once as a CUDA graph.

`fastdiff.sample(..., cuda_graph=True)` lands here. The loop keeps everything that changes
from step to step on the device, so one captured graph serves every step:

    static_x      (B, ...)   the current x_t, overwritten by each replay
    step_index    ()  int64  the respaced index i, decremented (mod S) by each replay: after the
                             S steps of a run it is S-1 again, so no replay reads outside [0, S)
    timestep_map  (S,) int64 original timestep of index i (what the model is fed)
    coef_table    (S, 7) f64 the fused step's scalars of index i (`coefficient_table`)

One replay = t = timestep_map[i] broadcast to (B,); out = model(static_x, t);
static_x <- sampler_step_table(static_x, out, coef_table, i); i <- (i - 1) mod S. The host only
launches replays: no `.item()`, no host-side tensor creation, no synchronisation inside
the loop. Graphs are cached per (model, shape, dtype, device, settings) and reused by later
calls; the tables are copied into the captured buffers. A graph reads the model's parameters
by address, so the cache key holds each parameter's and buffer's identity and storage address
(`model.half(); model.float()` or `load_state_dict(assign=True)` make a new key and drop the
stale graphs), and each model keeps at most `MAX_LOOPS_PER_MODEL` graphs (least recently used
evicted: each holds a memory pool).

`compile="reduce-overhead"` (or any torch.compile mode) instead runs the same static-buffer
loop with `torch.compile(model, mode=compile)`, letting torch's CUDA-graph trees capture the
model; the step itself stays one fused op.

On CPU tensors `cuda_graph=True` raises ValueError (there is nothing to capture); the
loop's logic is tested on CPU by running it without capture (`_StaticLoop(capture=False)`).
"""
from __future__ import annotations

import collections
import weakref
from typing import Callable, Dict, Optional, Sequence

import torch

from fastdiff.ops.sampler_step import StepCoefficients, coefficient_table, sampler_step_table

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class _StaticLoop:
    """Static buffers and the one-step function over them; optionally a captured CUDA graph."""

    def __init__(self, model: Callable, x: torch.Tensor, steps: int, *, seed: int, sample_offset: int,
                 clip_denoised: bool, variance: str, mean_only: bool, model_kwargs: dict,
                 split_output: Callable, capture: bool):
        try:  # weakly: the cache is keyed by the model, a strong reference here would keep it alive
            self._model = weakref.ref(model)
        except TypeError:
            self._model = lambda: model
        self.model_kwargs = model_kwargs
        self.split_output = split_output
        self.seed, self.sample_offset = seed, sample_offset
        self.clip_denoised, self.variance, self.mean_only = clip_denoised, variance, mean_only
        device = x.device
        self.static_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        self.step_index = torch.zeros((), dtype=torch.int64, device=device)
        self.timestep_map = torch.zeros((steps,), dtype=torch.int64, device=device)
        self.coef_table = torch.zeros((steps, 7), dtype=torch.float64, device=device)
        self.steps = steps
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.capture = capture

    def step(self) -> None:
        """One reverse step on the static buffers; device work only (what a replay repeats)."""
        batch = self.static_x.shape[0]
        t = self.timestep_map.index_select(0, self.step_index.reshape(1)).expand(batch).contiguous()
        out = self._model()(self.static_x, t, **self.model_kwargs).to(self.static_x.dtype)
        mean_part, _ = self.split_output(out, self.static_x)
        new_x = sampler_step_table(self.static_x, mean_part if self.mean_only else out, self.coef_table,
                                   self.step_index, seed=self.seed, sample_offset=self.sample_offset,
                                   clip_denoised=self.clip_denoised, variance=self.variance)
        self.static_x.copy_(new_x)
        # i <- (i - 1) mod S: after a run's S steps the index is back at S-1, and a replay outside
        # `run` (or one too many) still reads rows of the tables, never index -1, -2, ...
        self.step_index.sub_(1).remainder_(self.steps)

    def load(self, x: torch.Tensor, timestep_map: torch.Tensor, coef_table: torch.Tensor) -> None:
        self.static_x.copy_(x)
        self.timestep_map.copy_(timestep_map, non_blocking=True)
        self.coef_table.copy_(coef_table, non_blocking=True)
        self.step_index.fill_(self.timestep_map.shape[0] - 1)

    def _capture(self) -> None:
        """Warm up on a side stream (compiles Triton kernels, sets up cuBLAS/cuDNN workspaces),
        restore the buffers, then capture one step."""
        saved_x = self.static_x.clone()
        saved_index = self.step_index.clone()
        device = self.static_x.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.device(device), torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.static_x.copy_(saved_x)
        self.step_index.copy_(saved_index)
        graph = torch.cuda.CUDAGraph()
        try:  # capture on the tensors' device, whatever the current device is
            with torch.cuda.device(self.static_x.device), torch.cuda.graph(graph):
                self.step()
        except RuntimeError as err:
            raise RuntimeError("cuda_graph=True: capturing the sampler step failed; the model must not "
                               "synchronise with the host (no .item(), .cpu(), data-dependent shapes) and "
                               "the fused step needs the Triton backend on CUDA (pip install triton). "
                               f"Original error: {err}") from err
        self.graph = graph

    def run(self, steps: int) -> torch.Tensor:
        if self.capture and self.graph is None:
            self._capture()
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
        return self.static_x.clone()


MAX_LOOPS_PER_MODEL = 4


# Captured loops per model (weak: a dropped model drops its graphs) and per settings.
_cache: "weakref.WeakKeyDictionary[object, Dict[tuple, _StaticLoop]]" = weakref.WeakKeyDictionary()


def _storage_signature(model) -> tuple:
    """Identity and address of every parameter and buffer: what a captured graph reads by address."""
    tensors = []
    for attr in ("parameters", "buffers"):
        fn = getattr(model, attr, None)
        if callable(fn):
            tensors.extend(fn())
    return tuple((id(t), t.data_ptr(), t.dtype, str(t.device)) for t in tensors)


def _loop_for(model, x, steps, key_extra, **kwargs) -> _StaticLoop:
    capture = kwargs["capture"]
    if not capture:
        return _StaticLoop(model, x, steps, **kwargs)
    signature = _storage_signature(model)
    key = (signature, tuple(x.shape), x.dtype, str(x.device), steps) + key_extra
    try:
        per_model = _cache.setdefault(model, collections.OrderedDict())
    except TypeError:  # not weak-referenceable: no caching
        return _StaticLoop(model, x, steps, **kwargs)
    for stale in [k for k in per_model if k[0] != signature]:  # parameters moved: those graphs read freed memory
        del per_model[stale]
    loop = per_model.get(key)
    if loop is None:
        loop = per_model[key] = _StaticLoop(model, x, steps, **kwargs)
        while len(per_model) > MAX_LOOPS_PER_MODEL:
            per_model.popitem(last=False)
    per_model.move_to_end(key)
    return loop


def clear_cache() -> None:
    """Drop every captured graph (and the memory its pool holds)."""
    _cache.clear()


def sample_loop(model: Callable, x: torch.Tensor, coefs: Sequence[StepCoefficients], timestep_map: torch.Tensor,
                *, seed: int, sample_offset: int, clip_denoised: bool, variance: str, mean_only: bool,
                model_kwargs: Optional[dict], split_output: Callable, cuda_graph: bool = False,
                compile: Optional[str] = None, _capture: Optional[bool] = None) -> torch.Tensor:
    """Run all steps from x (= x_T) with static buffers; see the module docstring.

    coefs[i] and timestep_map[i] belong to respaced index i; steps run from S-1 down to 0.
    `_capture=False` runs the identical loop without capturing (the CPU test of this logic).
    """
    if compile is not None and compile not in COMPILE_MODES:
        raise ValueError(f"compile must be None or one of {COMPILE_MODES}, got {compile!r}")
    if cuda_graph and compile is not None:
        raise ValueError("cuda_graph=True and compile=... are two ways to capture the loop; choose one")
    capture = bool(cuda_graph) if _capture is None else bool(_capture)
    if capture:
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors, but sampling runs on {x.device}; "
                             "use cuda_graph=False (the default) on the CPU")
    steps = len(coefs)
    if timestep_map.numel() != steps:
        raise ValueError(f"timestep_map has {timestep_map.numel()} entries for {steps} steps")
    kwargs = dict(model_kwargs or {})
    if kwargs and capture:
        # Keyword tensors are baked into the graph by address; a cached graph would read stale ones.
        key_extra = (seed, sample_offset, clip_denoised, variance, mean_only,
                     tuple((k, id(v), v.data_ptr() if isinstance(v, torch.Tensor) else None)
                           for k, v in sorted(kwargs.items())))
    else:
        key_extra = (seed, sample_offset, clip_denoised, variance, mean_only)
    run_model = model
    if compile is not None:
        run_model = torch.compile(model, mode=compile)
        if x.device.type == "cuda" and compile in ("reduce-overhead", "max-autotune"):
            inner = run_model

            def run_model(*args, **kw):  # noqa: F811  (CUDA-graph trees: one generation per step)
                torch.compiler.cudagraph_mark_step_begin()
                return inner(*args, **kw).clone()
    loop = _loop_for(run_model, x, steps, key_extra,
                     seed=seed, sample_offset=sample_offset, clip_denoised=clip_denoised, variance=variance,
                     mean_only=mean_only, model_kwargs=kwargs, split_output=split_output, capture=capture)
    loop.split_output = split_output  # a shape check only; the settings it implies are in the key
    loop.load(x, timestep_map.to(torch.int64), coefficient_table(coefs, device="cpu"))
    return loop.run(steps)
