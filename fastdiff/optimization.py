"""`fastdiff.optimize(model, precision, mode)`: the fastest measured way to run a network,
behind the model's own call signature. (The module is `optimization`: `fastdiff.optimize` is
the function.)

What it applies, and why (figures in BENCHMARKS.md, bench/bench_e2e.py):
- torch.compile (inductor) of the whole network, fullgraph=True: fastdiff's fused ops are
  `torch.library` custom ops with fake kernels, so the graph has no breaks and inductor fuses
  the convolutions' epilogues around them;
- inference: inductor *freezing* (weights become constants: oneDNN prepacks the convolution
  weights once, and constant folding removes the per-call casts of bf16 weights), under no_grad;
- channels_last: the layout oneDNN's convolutions run fastest in;
- bf16 autocast where the hardware has native bf16 (CPU: AMX or AVX-512 BF16, read from
  /proc/cpuinfo; CUDA: `torch.cuda.is_bf16_supported()`); elsewhere bf16 is emulated and slow,
  so the path says so (it still runs: the caller asked for it);
- CUDA graphs on GPUs (compile mode "reduce-overhead").
`OptimizedModel.path` says which of these ran.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional, Set

import torch
import torch.nn as nn

PRECISIONS = ("fp32", "bf16")
MODES = ("inference", "train")


def cpu_flags() -> Set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> Optional[str]:
    """The name of the hardware bf16 path on `device`, or None when bf16 would be emulated."""
    if device.type == "cuda":
        return "cuda bf16" if torch.cuda.is_bf16_supported() else None
    flags = cpu_flags()
    for flag, name in (("amx_bf16", "AMX bf16"), ("avx512_bf16", "AVX-512 BF16")):
        if flag in flags:
            return name
    return None


def _check(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


class OptimizedModel(nn.Module):
    """`model` run the fast way; called like the model, returns fp32. Attributes the model has
    (diffusion, sample_shape, num_classes, ...) are read through, so fastdiff.sample takes it."""

    def __init__(self, model: nn.Module, precision: str, mode: str, compile: bool, fullgraph: bool,
                 channels_last: bool, cuda_graphs: bool, backend: str = "inductor"):
        super().__init__()
        self.model = model
        self.precision, self.mode, self.channels_last = precision, mode, channels_last
        device = next(model.parameters()).device
        self.device_type = device.type
        self.autocast = precision == "bf16"
        hw = native_bf16(device) if self.autocast else None
        steps = []
        if channels_last:
            model.to(memory_format=torch.channels_last)
            steps.append("channels_last")
        if self.autocast:
            steps.append(f"bf16 autocast ({hw})" if hw else
                         "bf16 autocast EMULATED (no AMX/AVX-512 BF16 on this CPU: expect it slower than fp32)")
        self._fn = model
        self._inductor_config = None
        if compile:
            kwargs = dict(fullgraph=fullgraph, backend=backend, dynamic=False)  # see fastdiff.compile
            if backend == "inductor":
                kwargs["options"] = {"triton.cudagraphs": cuda_graphs}
                # freezing is read from inductor's global config when the graph is compiled (at the
                # first call, and any recompile): passed in `options` it was silently ignored
                # (torch 2.13; the weights stayed graph inputs, cast to bf16 on every call), so
                # forward() patches the config around each call (tests/test_optimize.py checks it)
                self._inductor_config = {"freezing": mode == "inference"}
            self._fn = torch.compile(model, **kwargs)
            what = ("freezing" if mode == "inference" else "forward+backward") if backend == "inductor" else ""
            parts = [backend, what, "fullgraph" * fullgraph, "CUDA graphs" * cuda_graphs]
            steps.insert(0, f"torch.compile({', '.join(p for p in parts if p)})")
        self.path = f"{mode} on {device}: " + (" + ".join(steps) if steps else "eager fp32")
        self.first_call_seconds: Optional[float] = None
        if hasattr(model, "decode_latents"):  # a latent model decodes its samples under the same precision
            self.decode_latents = self._decode_latents

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def _decode_latents(self, z, **kwargs):
        with torch.no_grad(), torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model.decode_latents(z, **kwargs).float()

    def forward(self, x, t, **kwargs):
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        start = time.perf_counter() if self.first_call_seconds is None else None
        with torch.no_grad() if self.mode == "inference" else torch.enable_grad(), \
                torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast), \
                _inductor_config(self._inductor_config):
            out = self._fn(x, t, **kwargs)
        if start is not None:
            self.first_call_seconds = time.perf_counter() - start  # compilation, mostly
        out = getattr(out, "sample", out)  # a diffusers UNet's output
        return out.float().contiguous()


def _inductor_config(patch):
    if not patch:
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(patch)


def optimize(model: nn.Module, precision: str = "fp32", mode: str = "inference", *, compile: bool = True,
             fullgraph: bool = True, channels_last: bool = True, cuda_graphs: Optional[bool] = None,
             backend: str = "inductor") -> OptimizedModel:
    """The model behind the fastest measured path (see the module docstring); `.path` says
    which ran. precision: "fp32" | "bf16" (autocast: weights stay fp32, matmuls and convolutions
    run in bf16). mode: "inference" (no_grad, frozen weights: do not train the result) |
    "train" (gradients flow; a compiled forward and backward). cuda_graphs: None = on CUDA in
    inference mode. backend: torch.compile's ("eager"/"aot_eager" trace without inductor, for
    tests). Compiling the first call takes a while (about a minute for the CIFAR-10
    U-Net on 2 CPU cores); inductor's cache (TORCHINDUCTOR_CACHE_DIR) makes later processes faster."""
    _check("precision", precision, PRECISIONS)
    _check("mode", mode, MODES)
    if not isinstance(model, nn.Module) or next(model.parameters(), None) is None:
        raise TypeError(f"model must be a torch.nn.Module with parameters, got {type(model).__name__}")
    device = next(model.parameters()).device
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda" and mode == "inference"
    if cuda_graphs and (device.type != "cuda" or not compile or backend != "inductor"):
        raise ValueError(f"cuda_graphs=True needs a CUDA model compiled by inductor (model on {device}, "
                         f"compile={compile}, backend={backend!r})")
    if mode == "inference":
        model.eval()
    else:
        model.train()
    return OptimizedModel(model, precision, mode, compile, fullgraph, channels_last, cuda_graphs, backend)
