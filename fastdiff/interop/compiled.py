"""Ahead-of-time compiled models: `fastdiff export RUN --compiled --out model.pt2` compiles the
network once with AOTInductor (torch.export, then torch._inductor.aoti_compile_and_package) into
a package of generated C++ and its weights; `fastdiff.load_model("model.pt2")` and `fastdiff
sample model.pt2 ...` load it in a second and run it without compiling (no dynamo, no inductor).

What the package holds: the exported network (`x, t[, y] -> output`, one fixed batch size, the
sampler's batches are cut and padded to it), and, as AOTInductor metadata, the training config,
U-Net config, step and default guidance scale of `fastdiff export`'s .safetensors file, so the
loaded model carries its diffusion and guidance as every fastdiff model does.

fastdiff's fused ops are `torch.library` custom ops with Python bodies: in the package they
are calls back into the op (through the dispatcher, the proxy executor), so the package needs
`import fastdiff` in the loading process, which load_model does. `ops="reference"` replaces them
by their pure-torch references inside the exported graph (`run_decompositions`), for a package
that inductor compiles end to end.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Tuple

import torch
import torch.nn as nn

from fastdiff.errors import InputError

PACKAGE_FORMAT = "fastdiff-compiled-1"
PACKAGE_SUFFIX = ".pt2"
OPS_CHOICES = ("fused", "reference")


class _Exportable(nn.Module):
    """The network as torch.export sees it: positional (x, t[, y]), autocast inside for bf16."""

    def __init__(self, model: nn.Module, precision: str):
        super().__init__()
        self.model, self.bf16 = model, precision == "bf16"

    def forward(self, x, t, y=None):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x, t) if y is None else self.model(x, t, y=y)
        return out.float()


def _reference_decompositions() -> dict:
    """The fused forward ops -> their pure-torch references (for ops="reference"), written
    functionally (the ops' own reference kernels fill an output in place, which a decomposition
    may not)."""
    import importlib

    # the modules (fastdiff.ops.attention is also the name of the op's function)
    attn = importlib.import_module("fastdiff.ops.attention")
    gn = importlib.import_module("fastdiff.ops.group_norm")

    def group_norm_silu(x, weight, bias, num_groups, eps, act):
        y, mean, rstd = gn.group_norm_silu_reference(x, num_groups, weight, bias, eps, act)
        stats = gn.stats_dtype(x.dtype)
        return y.to(x.dtype), mean.to(stats), rstd.to(stats)

    def attention(q, k, v, scale):
        out, lse = attn._reference_compute(q, k, v, scale)
        return out, lse.to(attn.stats_dtype(q.dtype))

    table = torch.export.default_decompositions()
    table[torch.ops.fastdiff.group_norm_silu_fwd.default] = group_norm_silu
    table[torch.ops.fastdiff.attention_fwd.default] = attention
    return table


def export_compiled(model: nn.Module, path, metadata: dict, batch_size: int, precision: str = "fp32",
                    ops: str = "fused", freezing: bool = False) -> Tuple[Path, float]:
    """Compile `model` (a fastdiff U-Net in eval mode) for batches of `batch_size` into the
    AOTInductor package `path`; returns (path, seconds it took). `metadata`: strings stored in
    the package (see load_compiled)."""
    if ops not in OPS_CHOICES:
        raise ValueError(f"ops must be one of {OPS_CHOICES}, got {ops!r}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    t0 = time.perf_counter()
    model = model.eval()
    device = next(model.parameters()).device
    c, h, w = model.sample_shape
    x = torch.randn(batch_size, c, h, w, device=device)
    t = torch.zeros(batch_size, dtype=torch.long, device=device)
    args = (x, t) if not model.num_classes else (x, t, torch.zeros(batch_size, dtype=torch.long, device=device))
    with torch.no_grad():
        exported = torch.export.export(_Exportable(model, precision), args)
        if ops == "reference":
            exported = exported.run_decompositions(_reference_decompositions())
    meta = {k: str(v) for k, v in metadata.items()}
    meta.update(format=PACKAGE_FORMAT, batch_size=str(batch_size), precision=precision, ops=ops, freezing=str(freezing),
                sample_shape=json.dumps(list(model.sample_shape)), num_classes=json.dumps(model.num_classes),
                torch=torch.__version__)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written under its final name in a temp folder (the archive's root is named after the file),
    # then moved into place: a reader never sees half a package
    tmp_dir = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp_dir.mkdir(exist_ok=True)
    try:
        configs = {"aot_inductor.metadata": meta}
        if freezing:  # weights as constants: oneDNN prepacks the convolutions' (as fastdiff.optimize does)
            configs["freezing"] = True
        torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_dir / path.name),
                                                 inductor_configs=configs)
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path, time.perf_counter() - t0


class CompiledPackageModel(nn.Module):
    """A loaded package, called like the U-Net: model(x, t, y=None) -> fp32 output. Batches
    of any size are cut into the package's batch size (the last one padded by repeating its
    last sample; the padding's outputs are dropped: every sample's output depends on that
    sample only). Carries diffusion, sample_shape, num_classes and default_guidance_scale."""

    def __init__(self, runner, meta: dict, diffusion, path: Path, load_seconds: float):
        super().__init__()
        self.runner, self.meta, self.diffusion, self.path = runner, meta, diffusion, path
        self.batch_size = int(meta["batch_size"])
        self.sample_shape = tuple(json.loads(meta["sample_shape"]))
        self.num_classes = json.loads(meta["num_classes"])
        self.default_guidance_scale = float(meta["default_guidance_scale"])
        self.load_seconds = load_seconds
        self.path_description = (f"ahead-of-time compiled package {path.name} (AOTInductor, {meta['precision']}, "
                                 f"{meta['ops']} ops, batch {self.batch_size}; loaded in {load_seconds:.1f}s, "
                                 "no compilation)")

    def forward(self, x, t, y=None, **kwargs):
        if kwargs:
            raise TypeError(f"a compiled package takes (x, t, y=None); got extra arguments {sorted(kwargs)}")
        if (y is not None) != bool(self.num_classes):
            raise ValueError(f"this package's model {'needs' if self.num_classes else 'takes no'} class labels y")
        outs = []
        b = self.batch_size
        for s in range(0, x.shape[0], b):
            parts = [v[s:s + b] for v in ((x, t) if y is None else (x, t, y))]
            k = parts[0].shape[0]
            if k < b:  # pad with copies of the last sample
                parts = [torch.cat([v, v[-1:].expand(b - k, *v.shape[1:])]) for v in parts]
            outs.append(self.runner(*[p.contiguous() for p in parts])[:k])
        return torch.cat(outs)


def load_compiled(path, device="cpu") -> Tuple[CompiledPackageModel, dict]:
    """(model, info) from a package written by `fastdiff export --compiled`."""
    from fastdiff.train.config import build_diffusion, config_from_dict

    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such compiled package")
    if torch.device(device).type != "cpu":
        raise InputError(f"{path}: packages are compiled for the CPU here; got device {device!r}")
    t0 = time.perf_counter()
    try:
        runner = torch._inductor.aoti_load_package(str(path))
        meta = dict(runner.get_metadata())
    except Exception as e:  # the loader raises RuntimeError and others for damaged files
        raise InputError(f"{path}: not a loadable AOTInductor package ({type(e).__name__}: {str(e)[:300]})") from None
    if meta.get("format") != PACKAGE_FORMAT:
        raise InputError(f"{path}: not a fastdiff compiled package (format {meta.get('format')!r}; write one with "
                         "`fastdiff export RUN --compiled`)")
    if meta.get("torch") != torch.__version__:
        raise InputError(f"{path}: compiled with torch {meta.get('torch')}, this is torch {torch.__version__}; "
                         "AOTInductor packages are tied to the torch version: export it again")
    try:
        config = config_from_dict(json.loads(meta["config"]), strict=True)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: invalid package metadata ({type(e).__name__}: {e})") from None
    model = CompiledPackageModel(runner, meta, build_diffusion(config), path, time.perf_counter() - t0)
    info = {"config": dataclasses.asdict(config), "step": int(meta.get("step", 0)), "weights": meta.get("weights"),
            "source": str(path), "compiled": True}
    return model, info


def is_compiled_package(path) -> bool:
    p = Path(os.path.expanduser(str(path)))
    return p.suffix == PACKAGE_SUFFIX and p.is_file()


__all__ = ["CompiledPackageModel", "OPS_CHOICES", "PACKAGE_FORMAT", "export_compiled", "is_compiled_package",
           "load_compiled"]
