"""GPU benchmarks: the fused kernels against the memory/compute limits and torch, and DDIM-50
sampling with CUDA graphs against diffusers.

    python bench/bench_gpu.py --only sampler_step --json out.json      # one group
    python bench/bench_gpu.py --list                                    # the groups
    pytest bench/bench_gpu.py                                           # all groups, skipped without CUDA

Groups (each returns a list of result rows, dicts with "group", "name", "ms" and the figure
that matters):
- copy:            device-to-device copy bandwidth (the ceiling for memory-bound kernels)
- sampler_step:    GB/s of x + model_output read and x_{t-1} written; Triton, CUDA C++, torch eager
- group_norm_silu: GB/s (read x, write y; fwd) for NCHW and channels_last; Triton, CUDA C++,
                   torch eager (F.group_norm + F.silu); fwd and fwd+bwd
- attention:       TFLOP/s at U-Net shapes vs torch SDPA (fp16), fwd and fwd+bwd
- sampling:        DDIM-50, fastdiff.UNet.preset("ddpm-cifar10") at batch 64, fp16: plain loop, CUDA graph,
                   compile="reduce-overhead"; diffusers' UNet2DModel of the same configuration eager fp16
                   and torch.compile'd (skipped when diffusers is absent)
Timing: after warm-up, each call between two CUDA events, a 256 MiB buffer written before it so
that its inputs come from HBM rather than the 60 MB L2 (`flush=True`); the median of
iters x repeats calls. Sampling: CUDA events around whole runs, median of `repeats`. A call that
raises costs its own row (an "error" entry), never the rest of the group.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Callable, Dict, List

import torch

GROUPS = ("copy", "sampler_step", "group_norm_silu", "attention", "sampling")


# --------------------------------------------------------------------------- timing
_L2_FLUSH_BYTES = 256 << 20  # well past the 50-60 MB L2 of an H100/H200
_flush_buffer: List[torch.Tensor] = []


def _flush_l2() -> None:
    if not _flush_buffer:
        _flush_buffer.append(torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.float32, device="cuda"))
    _flush_buffer[0].zero_()


def cuda_time_ms(fn: Callable[[], object], iters: int = 10, repeats: int = 5, warmup: int = 3,
                 flush: bool = True) -> float:
    """Median per-call time in ms over iters * repeats calls, each between CUDA events, with the
    L2 flushed before each call when `flush` (see the module docstring)."""
    for _ in range(warmup):
        fn()
    events = []
    for _ in range(iters * repeats):
        if flush:
            _flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def _timed_rows(group: str, impls: Dict, tag: str, rows: List[Dict], figure: Callable[[float, object], Dict],
                **timing) -> None:
    """Time each impl (name -> (fn, work)); a failure costs that row only."""
    for name, (fn, work) in impls.items():
        label = f"{name} {tag}".strip()
        try:
            ms = cuda_time_ms(fn, **timing)
        except Exception as err:  # noqa: BLE001 - one failing kernel must not hide the others
            rows.append(_record({"group": group, "name": label, "error": f"{type(err).__name__}: {err}"[:500]}))
            continue
        rows.append(_row(group, label, ms, **figure(ms, work)))


_recorded: List[Dict] = []
_json_path: List[str] = []  # set by main(): rows are written as they come, so a killed run keeps them


def _record(row: Dict) -> Dict:
    _recorded.append(row)
    if _json_path:
        with open(_json_path[0], "w") as f:
            json.dump(_recorded, f, indent=1)
    return row


def _row(group: str, name: str, ms: float, **extra) -> Dict:
    row = {"group": group, "name": name, "ms": round(ms, 4)}
    row.update(extra)
    return _record(row)


# --------------------------------------------------------------------------- groups
def bench_copy() -> List[Dict]:
    n = 1 << 28  # 1 GiB of fp32: far past L2
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), iters=5, flush=False)  # 2 GiB moved: past L2 anyway
    gbs = 2 * n * 4 / (ms * 1e-3) / 1e9
    return [_row("copy", "d2d copy 1 GiB", ms, gbs=round(gbs, 1), nominal_gbs=4800)]


def _bandwidth(ms: float, moved: float, copy: float) -> Dict:
    gbs = moved / (ms * 1e-3) / 1e9
    return {"gbs": round(gbs, 1), "frac_of_copy": round(gbs / copy, 3)}


def _copy_gbs(rows_cache: Dict = {}) -> float:  # noqa: B006  (per-process cache)
    if "gbs" not in rows_cache:
        rows_cache["gbs"] = bench_copy()[0]["gbs"]
    return rows_cache["gbs"]


def bench_sampler_step() -> List[Dict]:
    from fastdiff.triton_kernels import cuda_native
    from fastdiff.triton_kernels.sampler_step import sampler_step_table_triton, sampler_step_triton
    from fastdiff.ops.sampler_step import coefficient_table
    from fastdiff.ops import StepCoefficients

    rows = []
    copy = _copy_gbs()
    coefs = [1.3, -0.7, 0.45, 0.6, 0.3, -6.0, -3.0]
    for shape in [(64, 3, 32, 32), (64, 4, 128, 128), (16, 3, 512, 512)]:
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(shape, device="cuda", dtype=dtype)
            out = torch.randn(shape, device="cuda", dtype=dtype)
            moved = 3 * x.numel() * x.element_size()
            table = coefficient_table([StepCoefficients(*coefs)] * 4, device="cuda")
            index = torch.tensor(2, device="cuda")
            impls = {
                "triton": lambda: sampler_step_triton(x, out, coefs, 1, 2, 0, True, 0),
                "triton-table": lambda: sampler_step_table_triton(x, out, table, index, 1, 0, True, 0),
                # torch eager: the same maths unfused, torch's own normal generator
                "torch-eager": lambda: coefs[2] * (coefs[0] * x + coefs[1] * out).clamp(-1, 1) + coefs[3] * x
                + coefs[4] * torch.randn_like(x),
            }
            if cuda_native.available():
                impls["cuda-native"] = lambda: cuda_native.sampler_step_cuda(x, out, coefs, 1, 2, 0, True, 0)
            _timed_rows("sampler_step", {name: (fn, moved) for name, fn in impls.items()},
                        f"{tuple(shape)} {str(dtype)[6:]}", rows, lambda ms, moved: _bandwidth(ms, moved, copy))
    return rows


def bench_group_norm_silu() -> List[Dict]:
    import torch.nn.functional as F

    from fastdiff.triton_kernels import cuda_native
    from fastdiff.triton_kernels.group_norm_silu import group_norm_silu_bwd_triton, group_norm_silu_fwd_triton

    rows = []
    copy = _copy_gbs()
    for (n, c, h, w), g in [((64, 128, 32, 32), 32), ((64, 256, 16, 16), 32), ((16, 512, 64, 64), 32)]:
        for dtype in (torch.float16, torch.bfloat16):
            for channels_last in (False, True):
                x = torch.randn(n, c, h, w, device="cuda", dtype=dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                weight = torch.randn(c, device="cuda")
                bias = torch.randn(c, device="cuda")
                x3 = x.flatten(2)
                gy = torch.randn_like(x3)
                mean_rstd = group_norm_silu_fwd_triton(x3, weight, bias, g, 1e-5, True)[1:]
                moved_fwd = 2 * x.numel() * x.element_size()  # x in, y out: what a perfect kernel moves
                moved_bwd = 3 * x.numel() * x.element_size()  # dy, x in; dx out
                tag = f"{(n, c, h, w)} {str(dtype)[6:]} {'NHWC' if channels_last else 'NCHW'}"
                impls = {
                    "triton fwd": (lambda: group_norm_silu_fwd_triton(x3, weight, bias, g, 1e-5, True), moved_fwd),
                    "triton bwd": (lambda: group_norm_silu_bwd_triton(gy, x3, weight, bias, *mean_rstd, g, 1e-5,
                                                                      True), moved_bwd),
                    "torch-eager fwd": (lambda: F.silu(F.group_norm(x, g, weight.to(dtype), bias.to(dtype))),
                                        moved_fwd),
                }
                if cuda_native.available():
                    impls["cuda-native fwd"] = (lambda: cuda_native.group_norm_silu_fwd_cuda(x3, weight, bias, g,
                                                                                             1e-5, True), moved_fwd)
                    impls["cuda-native bwd"] = (lambda: cuda_native.group_norm_silu_bwd_cuda(
                        gy, x3, weight, bias, *mean_rstd, g, 1e-5, True), moved_bwd)
                _timed_rows("group_norm_silu", impls, tag, rows, lambda ms, moved: _bandwidth(ms, moved, copy))
    return rows


def bench_attention() -> List[Dict]:
    import torch.nn.functional as F

    from fastdiff.triton_kernels.attention import attention_bwd_triton, attention_fwd_triton

    rows = []
    # ddpm-cifar10's attention at 16x16 (C=256, one head); iDDPM-style 4 heads of 64; a 32x32 LDM level
    for b, h, length, d in [(64, 1, 256, 256), (64, 4, 256, 64), (16, 8, 1024, 64)]:
        q, k, v = (torch.randn(b, h, length, d, device="cuda", dtype=torch.float16) for _ in range(3))
        scale = 1.0 / math.sqrt(d)
        out, lse = attention_fwd_triton(q, k, v, scale)
        go = torch.randn_like(out)
        flops = 4 * b * h * length * length * d
        qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))

        def sdpa_fwd_bwd():
            o = F.scaled_dot_product_attention(qs, ks, vs)
            torch.autograd.grad(o, (qs, ks, vs), go)

        impls = {
            "triton fwd": (lambda: attention_fwd_triton(q, k, v, scale), flops),
            "sdpa fwd": (lambda: F.scaled_dot_product_attention(q, k, v), flops),
            "triton bwd": (lambda: attention_bwd_triton(go, q, k, v, out, lse, scale), 2.5 * flops),
            "sdpa fwd+bwd": (sdpa_fwd_bwd, 3.5 * flops),
        }
        _timed_rows("attention", impls, f"B{b} H{h} L{length} D{d} fp16", rows,
                    lambda ms, work: {"tflops": round(work / (ms * 1e-3) / 1e12, 1)}, iters=5, flush=False)
    return rows


def diffusers_unet_like(preset_config: Dict):
    """diffusers' UNet2DModel with the configuration of a fastdiff U-Net preset (random weights)."""
    import diffusers

    widths = tuple(preset_config["model_channels"] * m for m in preset_config["channel_mult"])
    size = preset_config["image_size"]
    down = ["AttnDownBlock2D" if (size // 2 ** i) in preset_config["attention_resolutions"] else "DownBlock2D"
            for i in range(len(widths))]
    up = ["AttnUpBlock2D" if d == "AttnDownBlock2D" else "UpBlock2D" for d in reversed(down)]
    return diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=widths,
                                 layers_per_block=preset_config["num_res_blocks"], down_block_types=tuple(down),
                                 up_block_types=tuple(up), norm_num_groups=preset_config.get("num_groups", 32),
                                 attention_head_dim=None)


def bench_sampling(batch: int = 64, steps: int = 50) -> List[Dict]:
    import fastdiff

    rows = []
    dtype = torch.float16
    torch.manual_seed(0)
    model = fastdiff.UNet.preset("ddpm-cifar10").to("cuda", dtype).eval()
    kwargs = dict(n=batch, steps=steps, seed=0, device="cuda", dtype=dtype)

    def timed(fn, label, repeats: int = 3):
        name = f"{label} DDIM-{steps} batch {batch} fp16"
        try:
            fn()  # warm-up: Triton compilation, graph capture, torch.compile
            # whole runs between CUDA events (no L2 flush: a run's working set is its own)
            ms = cuda_time_ms(fn, iters=1, repeats=repeats, warmup=0, flush=False)
        except Exception as err:  # one failing route must not hide the others
            rows.append(_record({"group": "sampling", "name": name, "error": f"{type(err).__name__}: {err}"[:500]}))
            return
        rows.append(_row("sampling", name, ms, images_per_s=round(batch / (ms * 1e-3), 1), repeats=repeats))

    timed(lambda: fastdiff.sample(model, **kwargs), "fastdiff plain loop")
    timed(lambda: fastdiff.sample(model, cuda_graph=True, **kwargs), "fastdiff cuda_graph")
    try:
        import diffusers  # noqa: F401
        have_diffusers = True
    except ImportError:
        have_diffusers = False
        rows.append(_record({"group": "sampling", "name": "diffusers UNet2DModel", "skipped": "diffusers not installed"}))

    class AsEps(torch.nn.Module):
        """diffusers' model with fastdiff's call signature model(x, t) -> eps."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t):
            return self.inner(x, t).sample

    shape_kwargs = dict(shape=(batch, 3, 32, 32), steps=steps, seed=0, device="cuda", dtype=dtype)
    if have_diffusers:
        net = diffusers_unet_like(model.config).to("cuda", dtype).eval()
        timed(lambda: fastdiff.sample(AsEps(net), **shape_kwargs), "diffusers UNet2DModel eager")
    # the torch.compile routes last: their compilation may use up the step's time limit
    timed(lambda: fastdiff.sample(model, compile="reduce-overhead", **kwargs), "fastdiff compile=reduce-overhead")
    if have_diffusers:
        compiled = AsEps(torch.compile(net))
        timed(lambda: fastdiff.sample(compiled, **shape_kwargs), "diffusers UNet2DModel torch.compile")
    return rows


BENCHES = {"copy": bench_copy, "sampler_step": bench_sampler_step, "group_norm_silu": bench_group_norm_silu,
           "attention": bench_attention, "sampling": bench_sampling}


# --------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=GROUPS, action="append", help="run only these groups (repeatable)")
    p.add_argument("--json", help="write the result rows to this JSON file")
    p.add_argument("--list", action="store_true", help="print the groups and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(GROUPS))
        return 0
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device", file=sys.stderr)
        return 2
    if args.json:
        _json_path.append(args.json)
    for group in args.only or GROUPS:
        BENCHES[group]()
    print(json.dumps(_recorded, indent=1))
    return 0


# --------------------------------------------------------------------------- pytest entry
try:
    import pytest

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    @pytest.mark.parametrize("group", GROUPS)
    def test_bench_gpu(group):
        rows = BENCHES[group]()
        assert rows and all("name" in r for r in rows)
        print(json.dumps(rows, indent=1))
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    sys.exit(main())
