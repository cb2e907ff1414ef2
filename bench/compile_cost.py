"""What compiling costs, per process: the figures behind fastdiff/cli/fast.py's `--fast auto`.

Each mode runs in its own process (a fresh interpreter is the point) and prints one JSON line:

    D=$(mktemp -d)
    TORCHINDUCTOR_CACHE_DIR=$D/cache python bench/compile_cost.py jit      # first process: empty cache
    TORCHINDUCTOR_CACHE_DIR=$D/cache python bench/compile_cost.py jit      # second process: inductor's cache
    TORCHINDUCTOR_CACHE_DIR=$D/aot python bench/compile_cost.py aot-export --package $D/unet.pt2
    python bench/compile_cost.py aot-load --package $D/unet.pt2            # loads, never compiles

Options: --preset (default ddpm-cifar10), --batch (default 8), --precision fp32|bf16,
--ops fused|reference and --freezing (aot-export). Not a pytest-benchmark file: compile times are one-off
costs, measured once per process, not timed loops.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time


def _model(preset: str):
    import torch

    from fastdiff.models.unet import UNet

    torch.manual_seed(0)
    return UNet.preset(preset).eval()


def _inputs(model, batch: int):
    import torch

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *model.sample_shape, generator=gen)
    t = torch.randint(0, model.diffusion.T, (batch,), generator=gen)
    return x, t


def _best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_jit(a) -> dict:
    """fastdiff.optimize's torch.compile path: the first call (compilation) and later calls."""
    import torch

    import fastdiff

    model = _model(a.preset)
    x, t = _inputs(model, a.batch)
    with torch.no_grad():
        model(x, t)
        eager = _best_of(lambda: model(x, t))
    fast = fastdiff.optimize(model, precision=a.precision)
    start = time.perf_counter()
    fast(x, t)
    first = time.perf_counter() - start
    compiled = _best_of(lambda: fast(x, t))
    return {"mode": "jit", "path": fast.path, "first_call_s": round(first, 2), "compiled_call_s": round(compiled, 4),
            "eager_call_s": round(eager, 4), "compiled_over_eager": round(compiled / eager, 3)}


def _metadata(preset: str) -> dict:
    from fastdiff.train.config import TrainConfig

    config = TrainConfig(data="cifar10", out="unused", steps=1, preset=preset)
    return {"config": json.dumps(dataclasses.asdict(config)), "model_config": "{}", "step": 0, "weights": "model",
            "default_guidance_scale": "0.0"}


def measure_aot_export(a) -> dict:
    from fastdiff.interop.compiled import export_compiled

    model = _model(a.preset)
    path, seconds = export_compiled(model, a.package, _metadata(a.preset), a.batch, a.precision, a.ops, a.freezing)
    return {"mode": "aot-export", "package": str(path), "export_s": round(seconds, 2),
            "package_mb": round(path.stat().st_size / 1e6, 1), "ops": a.ops, "freezing": a.freezing}


def measure_aot_load(a) -> dict:
    import torch

    start = time.perf_counter()
    import fastdiff  # noqa: F401 - registers the fused ops the package calls
    from fastdiff.interop.compiled import load_compiled
    imported = time.perf_counter() - start
    model, _ = load_compiled(a.package)
    x, t = _inputs(_model(a.preset), a.batch)  # the same weights (seeded) for the comparison
    start = time.perf_counter()
    out = model(x, t)
    first = time.perf_counter() - start
    call = _best_of(lambda: model(x, t))
    with torch.no_grad():
        ref = _model(a.preset)(x, t)
    return {"mode": "aot-load", "import_s": round(imported, 2), "load_s": round(model.load_seconds, 2),
            "first_call_s": round(first, 3), "call_s": round(call, 4),
            "max_abs_diff_vs_eager": float((out - ref).abs().max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("jit", "aot-export", "aot-load"))
    p.add_argument("--preset", default="ddpm-cifar10")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--ops", choices=("fused", "reference"), default="fused")
    p.add_argument("--package", default="unet.pt2")
    p.add_argument("--freezing", action="store_true", help="aot-export: inductor freezing (weights as constants)")
    a = p.parse_args()
    measure = {"jit": measure_jit, "aot-export": measure_aot_export, "aot-load": measure_aot_load}[a.mode]
    import torch
    result = measure(a)
    result.update(preset=a.preset, batch=a.batch, precision=a.precision, threads=torch.get_num_threads(),
                  cache_dir=os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
