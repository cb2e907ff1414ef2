"""One prepared GPU check: build, test with CUDA tensors, benchmark; results as JSON + markdown.

    python bench/gpu_check.py --out "$OUT"              # on a machine with a CUDA GPU
    python bench/gpu_check.py --dry-run                 # print the plan and its time budget (anywhere)

Steps, each a subprocess with a hard timeout; worst case WORST_CASE_S (5 minutes), so that a
second run still fits in about 12 minutes of machine time with start-up:
  env             torch / CUDA / triton versions, nvidia-smi
  build           pip install with FASTDIFF_CUDA=ON (a missing nvcc fails loudly), sm_90 only
  build-triton    only if `build` failed: the same install with FASTDIFF_CUDA=OFF, so that the
                  Triton steps still run
  warm            compiles every Triton kernel the tests and benchmarks use, once, into the
                  compile caches that every later step shares (TRITON_CACHE_DIR and
                  TORCHINDUCTOR_CACHE_DIR under <out>/cache)
  gpu-tests       FASTDIFF_TEST_DEVICE=cuda pytest on the GPU test files only, each test limited to
                  TEST_TIMEOUT_S, one JSON line per test written as it finishes (<out>/gpu_tests.jsonl)
                  and a junit XML at the end
  bench-<group>   python bench/bench_gpu.py --only <group>: CUDA events, repeats, L2 flushed between
                  timed calls; rows written as they come; an exception costs its row, not the group
A step that fails or times out is recorded and the next one runs. Results:
<out>/gpu_check.json (every step: command, status, seconds, output tail, rows) and
<out>/gpu_check.md (a summary table per step), rewritten after every step.
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
WORST_CASE_S = 300  # 5 minutes: two runs and a machine start-up fit in about 12 minutes
TEST_TIMEOUT_S = 45
# The test files that exercise CUDA tensors (the rest of the suite is CPU work the GPU machine
# need not repeat).
GPU_TEST_FILES = ("tests/test_cuda_build.py", "tests/test_triton_kernels.py", "tests/test_cuda_graphs.py",
                  "tests/test_op_dispatch.py")
BENCH_TIMEOUT_S = {"copy": 5, "sampler_step": 15, "group_norm_silu": 15, "attention": 15, "sampling": 30}


@dataclasses.dataclass
class Step:
    name: str
    cmd: List[str]
    timeout_s: float
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    json_out: Optional[str] = None  # file the step writes its rows to (JSON list, or JSON lines)
    only_if_failed: Optional[str] = None  # run only when this earlier step did not succeed
    why: str = ""  # one line for the printed plan


@dataclasses.dataclass
class StepResult:
    name: str
    cmd: str
    status: str  # ok | failed | timeout | skipped | dry-run
    seconds: float = 0.0
    returncode: Optional[int] = None
    output_tail: str = ""
    rows: List[Dict] = dataclasses.field(default_factory=list)


_WARM = """
import torch
from fastdiff import ops
from fastdiff.triton_kernels import attention as ta, group_norm_silu as tg, sampler_step as ts
d = "cuda"
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    x = torch.randn(2, 8, 8, 8, device=d, dtype=dtype)
    for mode in (0, 1):
        out = torch.randn(2, 8 * (2 if mode else 1), 8, 8, device=d, dtype=dtype)
        ts.sampler_step_triton(x, out, [1.0, -0.1, 0.5, 0.5, 0.1, -3.0, -1.0], 1, 1, 0, True, mode)
    table = torch.zeros(3, 7, dtype=torch.float64, device=d)
    ts.sampler_step_table_triton(x, x, table, torch.tensor(1, device=d), 1, 0, True, 0)
    for cl in (False, True):
        x3 = x.flatten(2) if not cl else x.contiguous(memory_format=torch.channels_last).flatten(2)
        y, m, r = tg.group_norm_silu_fwd_triton(x3, None, None, 4, 1e-5, True)
        tg.group_norm_silu_bwd_triton(torch.ones_like(x3), x3, None, None, m, r, 4, 1e-5, True)
    for dim in (64, 256):
        q = torch.randn(2, 1, 64, dim, device=d, dtype=dtype)
        o, lse = ta.attention_fwd_triton(q, q, q, 0.1)
        ta.attention_bwd_triton(o, q, q, q, o, lse, 0.1)
torch.cuda.synchronize()
print("warm: Triton kernels compiled")
"""


def plan(out_dir: Path, python: str = sys.executable, skip_build: bool = False, skip_tests: bool = False,
         groups=BENCH_GROUPS) -> List[Step]:
    """The steps, with per-step timeouts whose worst case (`worst_case_seconds`) fits WORST_CASE_S."""
    env_probe = ("import torch, json, shutil, subprocess; "
                 "info = {'torch': torch.__version__, 'cuda': torch.version.cuda, "
                 "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}; "
                 "exec('try:\\n import triton; info[\"triton\"] = triton.__version__\\nexcept ImportError:\\n "
                 "info[\"triton\"] = None'); "
                 "smi = shutil.which('nvidia-smi'); "
                 "info['nvidia_smi'] = subprocess.run([smi], capture_output=True, text=True).stdout[-1500:] "
                 "if smi else None; print(json.dumps(info))")
    cache = out_dir / "cache"
    shared_env = {"TRITON_CACHE_DIR": str(cache / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}
    steps = [Step("env", [python, "-c", env_probe], 10, why="versions and nvidia-smi")]
    if not skip_build:
        pip = [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q"]
        jobs = {"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 4)}
        steps.append(Step("build", pip + ["-Ccmake.define.FASTDIFF_CUDA=ON",
                                          "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90", "."], 90,
                          env={**jobs, "CUDAARCHS": "90"}, why="fastdiff._C and _C_cuda; nvcc required"))
        steps.append(Step("build-triton", pip + ["-Ccmake.define.FASTDIFF_CUDA=OFF", "."], 40, env=jobs,
                          only_if_failed="build", why="if the CUDA build failed: the CPU core, Triton steps run"))
    steps.append(Step("warm", [python, "-c", _WARM], 25, env=shared_env,
                      why="compile the Triton kernels once into the shared cache"))
    if not skip_tests:
        # Not `python -m pytest`: that puts the source tree first on sys.path, shadowing the
        # installed package (its compiled modules, and fastdiff.triton_kernels, live only there).
        pytest_exe = Path(python).parent / "pytest"
        runner = [str(pytest_exe)] if pytest_exe.exists() else [python, "-P", "-m", "pytest"]
        jsonl = str(out_dir / "gpu_tests.jsonl")
        steps.append(Step("gpu-tests", runner + ["-q", "-p", "no:cacheprovider", "-p", "_gpu_results",
                                                 f"--junitxml={out_dir / 'gpu_tests.xml'}", *GPU_TEST_FILES],
                          50, env={**shared_env, "FASTDIFF_TEST_DEVICE": "cuda", "FASTDIFF_RESULTS_JSONL": jsonl,
                                   "FASTDIFF_TEST_TIMEOUT": str(TEST_TIMEOUT_S),
                                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "bench"),
                                                                               os.environ.get("PYTHONPATH")]))},
                          json_out=jsonl, why=f"GPU test files, {TEST_TIMEOUT_S} s per test, a JSON line per test"))
    for group in groups:
        json_out = str(out_dir / f"bench_{group}.json")
        steps.append(Step(f"bench-{group}", [python, "bench/bench_gpu.py", "--only", group, "--json", json_out],
                          BENCH_TIMEOUT_S[group], env=shared_env, json_out=json_out,
                          why="CUDA events, repeats, L2 flushed"))
    assert worst_case_seconds(steps) <= WORST_CASE_S, "the plan must fit its budget"
    return steps


def worst_case_seconds(steps: List[Step]) -> float:
    """Every step at its timeout; a conditional step counts (its trigger may fail at its timeout)."""
    return sum(s.timeout_s for s in steps)


def format_plan(steps: List[Step]) -> str:
    lines = [f"{'step':<22} {'limit s':>8}  command / why"]
    for s in steps:
        cond = f" [only if {s.only_if_failed} failed]" if s.only_if_failed else ""
        lines.append(f"{s.name:<22} {s.timeout_s:>8.0f}  {s.why}{cond}")
        lines.append(f"{'':<32}{' '.join(s.cmd)[:150]}".replace("\n", "; "))
    total = worst_case_seconds(steps)
    lines.append(f"worst case {total:.0f} s of {WORST_CASE_S} s budget ({total / 60:.1f} min); a rerun and machine "
                 f"start-up (~2 min) still fit in about 12 min")
    return "\n".join(lines)


def _tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def run_step(step: Step, dry_run: bool = False, cwd: Path = ROOT) -> StepResult:
    shown = " ".join(step.cmd)
    if dry_run:
        return StepResult(step.name, shown, "dry-run")
    env = dict(os.environ, **step.env)
    if step.json_out and step.json_out.endswith(".jsonl") and os.path.exists(step.json_out):
        os.remove(step.json_out)  # this run's lines only
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
        result.rows = read_rows(step.json_out, result)
    return result


def read_rows(path: str, result: Optional[StepResult] = None) -> List[Dict]:
    """A JSON list, or JSON lines (a killed step leaves every complete line)."""
    try:
        with open(path) as f:
            text = f.read()
        if path.endswith(".jsonl"):
            rows = []
            for line in text.splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass  # the line being written when the step was killed
            return rows
        return json.loads(text)
    except (OSError, ValueError) as err:
        if result is not None:
            result.output_tail += f"\n(could not read {path}: {err})"
        return []


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
        if "test" in r.rows[0]:  # test verdicts: the counts and every test that did not pass
            counts = {}
            for row in r.rows:
                counts[row.get("outcome")] = counts.get(row.get("outcome"), 0) + 1
            lines += ["", f"## {r.name}", "", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))]
            for row in r.rows:
                if row.get("outcome") == "failed":
                    lines.append(f"- FAILED {row['test']}: {row.get('message', '')[-300:]}")
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
    p.add_argument("--dry-run", action="store_true", help="print and write the plan and its time budget, run nothing")
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
            "budget_s": WORST_CASE_S, "worst_case_s": worst_case_seconds(steps), "python": sys.executable}
    print(format_plan(steps), flush=True)
    results: List[StepResult] = []
    start = time.monotonic()
    status = {}
    for step in steps:
        if step.only_if_failed and status.get(step.only_if_failed) in ("ok", None):
            results.append(StepResult(step.name, " ".join(step.cmd), "skipped"))
        else:
            results.append(run_step(step, dry_run=args.dry_run))
        status[step.name] = results[-1].status
        print(f"[gpu_check] {step.name}: {results[-1].status} ({results[-1].seconds:.1f} s)", flush=True)
        write_results(out_dir, results, meta)  # after every step: a killed run still leaves its results
    meta["total_seconds"] = round(time.monotonic() - start, 1)
    paths = write_results(out_dir, results, meta)
    print(f"[gpu_check] wrote {paths['json']} and {paths['markdown']}")
    failed = [r for r in results if r.status in ("failed", "timeout")]
    recovered = {"build"} if any(r.name == "build-triton" and r.status == "ok" for r in results) else set()
    return 0 if all(r.name in recovered for r in failed) else 1


if __name__ == "__main__":
    sys.exit(main())
