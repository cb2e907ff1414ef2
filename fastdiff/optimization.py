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

Training (`mode="train"` compiles the forward and, through AOTAutograd, the backward) has a
second half, `CompiledUpdate`: gradient clipping, the AdamW step and the EMA of the weights as
compiled graphs over the optimizer's own state (`fastdiff train --compile`). Compile costs and
the ahead-of-time alternative (`fastdiff export --compiled`): fastdiff/cli/fast.py.
"""
from __future__ import annotations

import contextlib
import time
from functools import partial
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
    tests). Compiling the first call takes a while (the CIFAR-10 U-Net: 437 s in a first process,
    75 s in a second one reusing inductor's cache, TORCHINDUCTOR_CACHE_DIR; one thread of a busy
    2-core CPU; fastdiff/cli/fast.py); `fastdiff export --compiled` packages load without compiling."""
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


# --------------------------------------------------------------------------- the training step
def _global_grad_norm(grads):
    """‖g‖₂ over all gradients: torch.nn.utils.clip_grad_norm_'s total norm (norm of the norms)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2)), 2)


def _clipped_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, total_norm, decay, step_size, bc2_sqrt, *,
                   max_norm: float, beta1: float, beta2: float, eps: float):
    """Gradient clipping and one AdamW step, in place.

    AdamW is Loshchilov & Hutter (2019), Algorithm 2, in torch.optim.AdamW's formulation
    (its capturable branch: the step-dependent scalars are tensors, so one compiled graph
    serves every step and learning rate):
        θ ← θ (1 − η λ);  m ← β1 m + (1 − β1) g;  v ← β2 v + (1 − β2) g²;
        θ ← θ − η / (1 − β1^k) · m / (√v / √(1 − β2^k) + ε).
    Clipping is clip_grad_norm_'s rule, g ← g · min(1, max_norm / (‖g‖ + 1e-6))."""
    if max_norm > 0:
        grads = torch._foreach_mul(grads, torch.clamp(max_norm / (total_norm + 1e-6), max=1.0))
    torch._foreach_add_(steps, 1)
    torch._foreach_mul_(params, decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_div_(denom, step_size)  # step_size = −η / (1 − β1^k): the division gives the sign
    torch._foreach_addcdiv_(params, exp_avgs, denom)


def _ema_lerp(ema_params, params, weight):
    """θ_ema ← θ_ema + w (θ − θ_ema), w = 1 − rate (fastdiff.train.ema.ema_update's lerp)."""
    delta = torch._foreach_sub(params, ema_params)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(ema_params, delta)


class CompiledUpdate:
    """The optimizer half of a compiled training step: gradient clipping by global norm, the
    `torch.optim.AdamW` step and the EMA of the weights, as compiled graphs (the norm; the
    clipped update; the EMA: after the norm the host checks that it is finite, and skips the
    step when it is not, as the eager loop does). The forward and backward half is the compiled model
    (`optimize(model, mode="train")` or torch.compile).

    It updates the optimizer's own state tensors (exp_avg, exp_avg_sq, step: created as
    AdamW creates them), so `optimizer.state_dict()` — the checkpoint — has the same form and
    meaning as after eager steps, and a run can resume eagerly or compiled. The learning rate
    and EMA rate may change every step without recompiling: they enter as tensors.

        update = CompiledUpdate(opt, grad_clip=1.0, ema=(ema_model, model))
        loss.backward()
        applied = update(lr, ema_rate)   # False: the gradient norm was not finite, nothing changed
    """

    def __init__(self, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0, ema=None,
                 backend: str = "inductor"):
        self.opt = optimizer
        self._check_optimizer(optimizer)
        if not (grad_clip >= 0 and grad_clip < float("inf")):
            raise ValueError(f"grad_clip must be a finite number >= 0 (0: no clipping), got {grad_clip!r}")
        self.grad_clip = float(grad_clip)
        self.ema = ema
        self.backend = backend
        self.params = list(optimizer.param_groups[0]["params"])
        kwargs = dict(backend=backend, fullgraph=True, dynamic=False)
        self._norm = torch.compile(_global_grad_norm, **kwargs)
        self._update = torch.compile(_clipped_adamw, **kwargs)
        self._ema = torch.compile(_ema_lerp, **kwargs)

    @staticmethod
    def _check_optimizer(opt) -> None:
        if not isinstance(opt, torch.optim.AdamW):
            raise TypeError(f"optimizer must be a torch.optim.AdamW, got {type(opt).__name__}")
        if len(opt.param_groups) != 1:
            raise ValueError(f"optimizer must have one parameter group, got {len(opt.param_groups)}")
        group = opt.param_groups[0]
        unsupported = [k for k in ("amsgrad", "maximize", "capturable", "differentiable", "fused") if group.get(k)]
        if unsupported:
            raise ValueError(f"optimizer options {unsupported} are not supported by CompiledUpdate "
                             "(it implements plain AdamW)")

    def _state(self, params):
        """(exp_avgs, exp_avg_sqs, steps), created as torch.optim.AdamW creates them."""
        state = self.opt.state
        for p in params:
            if not state[p]:
                state[p]["step"] = torch.tensor(0.0, dtype=torch.float32)  # AdamW: a CPU float step count
                state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return ([state[p]["exp_avg"] for p in params], [state[p]["exp_avg_sq"] for p in params],
                [state[p]["step"] for p in params])

    @torch.no_grad()
    def __call__(self, lr: float, ema_rate: Optional[float] = None) -> bool:
        """Apply one step (learning rate `lr`, EMA decay `ema_rate`); False (nothing applied)
        when the gradient norm is not finite. Gradients are left as they are."""
        if self.ema is not None and ema_rate is None:
            raise ValueError("ema_rate is needed: this update keeps an EMA")
        group = self.opt.param_groups[0]
        group["lr"] = lr  # what AdamW records, so the state_dict says which lr ran
        params = [p for p in self.params if p.grad is not None]  # AdamW skips the others too
        if not params:
            return True
        grads = [p.grad for p in params]
        total = self._norm(grads) if self.grad_clip > 0 else torch.zeros(())
        if self.grad_clip > 0 and not bool(torch.isfinite(total)):
            return False
        exp_avgs, exp_avg_sqs, steps = self._state(params)
        beta1, beta2 = group["betas"]
        k = float(steps[0]) + 1  # this step's count (every parameter's is the same under AdamW)
        scalar = partial(torch.tensor, dtype=torch.float64, device=params[0].device)
        self._update(params, grads, exp_avgs, exp_avg_sqs, steps, total, scalar(1.0 - lr * group["weight_decay"]),
                     scalar(-lr / (1.0 - beta1 ** k)), scalar((1.0 - beta2 ** k) ** 0.5),
                     max_norm=self.grad_clip, beta1=beta1, beta2=beta2, eps=group["eps"])
        if self.ema is not None:
            ema_model, model = self.ema
            self._ema(list(ema_model.parameters()), [p.detach() for p in model.parameters()], scalar(1.0 - ema_rate))
            for eb, mb in zip(ema_model.buffers(), model.buffers()):
                eb.copy_(mb)
        return True
