"""One prepared GPU check: build, test with CUDA tensors, benchmark; results as JSON + markdown.

    python bench/gpu_check.py --out "$OUT"              # on a machine with a CUDA GPU
    python bench/gpu_check.py --dry-run --out /tmp/x    # what it would run (works anywhere)

Steps, each a subprocess with a hard timeout (the whole plan fits in under 8 minutes):
  env            torch / CUDA / triton versions, nvidia-smi
  build          pip install --no-build-isolation --no-deps .   (compiles fastdiff._C and _C_cuda)
  tests          FASTDIFF_TEST_DEVICE=cuda pytest tests/         (CUDA tensors where a test supports them)
  bench-<group>  python bench/bench_gpu.py --only <group>         (copy, sampler_step, group_norm_silu,
                                                                   attention, sampling)
A step that fails or times out is recorded and the next one runs. Results:
<out>/gpu_check.json (every step: command, status, seconds, output tail, benchmark rows) and
<out>/gpu_check.md (a summary table per benchmark group).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH_GROUPS = ("copy", "sampler_step", "group_norm_silu", "attention", "sampling")
TOTAL_BUDGET_S = 480  # 8 minutes


@dataclasses.dataclass
class Step:
    name: str
    cmd: List[str]
    timeout_s: float
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    json_out: Optional[str] = None  # file the step writes its benchmark rows to


@dataclasses.dataclass
class StepResult:
    name: str
    cmd: str
    status: str  # ok | failed | timeout | skipped | dry-run
    seconds: float = 0.0
    returncode: Optional[int] = None
    output_tail: str = ""
    rows: List[Dict] = dataclasses.field(default_factory=list)


def plan(out_dir: Path, python: str = sys.executable, skip_build: bool = False, skip_tests: bool = False,
         groups=BENCH_GROUPS) -> List[Step]:
    """The steps, with per-step timeouts that add up to less than TOTAL_BUDGET_S."""
    env_probe = ("import torch, json, shutil, subprocess; "
                 "info = {'torch': torch.__version__, 'cuda': torch.version.cuda, "
                 "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}; "
                 "exec('try:\\n import triton; info[\"triton\"] = triton.__version__\\nexcept ImportError:\\n "
                 "info[\"triton\"] = None'); "
                 "smi = shutil.which('nvidia-smi'); "
                 "info['nvidia_smi'] = subprocess.run([smi], capture_output=True, text=True).stdout[-1500:] "
                 "if smi else None; print(json.dumps(info))")
    steps = [Step("env", [python, "-c", env_probe], 15)]
    if not skip_build:
        steps.append(Step("build", [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q", "."],
                          110, env={"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 4)}))
    if not skip_tests:
        # Not `python -m pytest`: that puts the source tree first on sys.path, shadowing the
        # installed package (its compiled modules, and fastdiff.triton_kernels, live only there).
        pytest_exe = Path(python).parent / "pytest"
        runner = [str(pytest_exe)] if pytest_exe.exists() else [python, "-P", "-m", "pytest"]
        # The GPU path's own tests first, so that a timeout still leaves their verdict in the output.
        first = ["tests/test_triton_kernels.py", "tests/test_cuda_graphs.py", "tests/test_cuda_build.py"]
        # With pytest-xdist the whole suite is spread over the machine's cores (order then not kept).
        workers = ["-n", str(min(8, os.cpu_count() or 1))] if importlib.util.find_spec("xdist") else []
        steps.append(Step("tests", runner + ["-q", "-p", "no:cacheprovider", *workers, *first, "tests/"], 120,
                          env={"FASTDIFF_TEST_DEVICE": "cuda"}))
    per_group = {"copy": 10, "sampler_step": 25, "group_norm_silu": 40, "attention": 35, "sampling": 120}
    for group in groups:
        json_out = str(out_dir / f"bench_{group}.json")
        steps.append(Step(f"bench-{group}", [python, "bench/bench_gpu.py", "--only", group, "--json", json_out],
                          per_group[group], json_out=json_out))
    assert sum(s.timeout_s for s in steps) <= TOTAL_BUDGET_S, "the plan must fit the 8-minute budget"
    return steps


def _tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def run_step(step: Step, dry_run: bool = False, cwd: Path = ROOT) -> StepResult:
    shown = " ".join(step.cmd)
    if dry_run:
        return StepResult(step.name, shown, "dry-run")
    env = dict(os.environ, **step.env)
    start = time.monotonic()
    # A new session so that a timeout kills the step's whole process group (pip's cmake, pytest workers).
    proc = subprocess.Popen(step.cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=step.timeout_s)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        status = "timeout"
    result = StepResult(step.name, shown, status, round(time.monotonic() - start, 2), proc.returncode,
                        _tail(output or ""))
    if step.json_out and os.path.exists(step.json_out):
        try:
            with open(step.json_out) as f:
                result.rows = json.load(f)
        except (OSError, ValueError) as err:
            result.output_tail += f"\n(could not read {step.json_out}: {err})"
    return result


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_markdown(results: List[StepResult], meta: Dict) -> str:
    lines = ["# fastdiff GPU check", ""]
    for key, value in meta.items():
        lines.append(f"- {key}: {value}")
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {_fmt(r.seconds)} |")
    for r in results:
        if not r.rows:
            continue
        keys = []
        for row in r.rows:
            for k in row:
                if k not in ("group", "name") and k not in keys:
                    keys.append(k)
        lines += ["", f"## {r.name}", "", "| name | " + " | ".join(keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for row in r.rows:
            lines.append(f"| {row.get('name', '')} | " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |")
    failed = [r for r in results if r.status in ("failed", "timeout")]
    for r in failed:
        lines += ["", f"## {r.name}: {r.status}", "", "```", r.output_tail[-2000:], "```"]
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, results: List[StepResult], meta: Dict) -> Dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "gpu_check.json", out_dir / "gpu_check.md"
    payload = {"meta": meta, "steps": [dataclasses.asdict(r) for r in results]}
    json_path.write_text(json.dumps(payload, indent=1))
    md_path.write_text(to_markdown(results, meta))
    return {"json": json_path, "markdown": md_path}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Build, test and benchmark fastdiff on a CUDA GPU.")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_results",
                   help="directory for gpu_check.json / gpu_check.md (default: $OUT)")
    p.add_argument("--dry-run", action="store_true", help="write the plan without running anything")
    p.add_argument("--skip-build", action="store_true", help="use the installed fastdiff")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--bench", choices=BENCH_GROUPS, action="append",
                   help="benchmark groups to run (repeatable; default: all)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = plan(out_dir, skip_build=args.skip_build, skip_tests=args.skip_tests,
                 groups=tuple(args.bench) if args.bench else BENCH_GROUPS)
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "dry_run": args.dry_run,
            "budget_s": TOTAL_BUDGET_S, "python": sys.executable}
    results: List[StepResult] = []
    start = time.monotonic()
    for step in steps:
        results.append(run_step(step, dry_run=args.dry_run))
        print(f"[gpu_check] {step.name}: {results[-1].status} ({results[-1].seconds:.1f} s)", flush=True)
        write_results(out_dir, results, meta)  # after every step: a killed run still leaves its results
    meta["total_seconds"] = round(time.monotonic() - start, 1)
    paths = write_results(out_dir, results, meta)
    print(f"[gpu_check] wrote {paths['json']} and {paths['markdown']}")
    return 0 if all(r.status in ("ok", "dry-run") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
