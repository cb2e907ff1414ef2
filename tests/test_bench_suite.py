"""`pytest bench/ --benchmark-only` collects every benchmark file (issue: it used to collect
none, the files being named bench_*.py). Running them is bench/ci_smoke.sh's job."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pytest_bench_collects_every_benchmark_file(tmp_path):
    # Run outside the source tree: `python -m` puts the working directory first on sys.path, and
    # the tree's fastdiff/ has no compiled core (nor fastdiff.triton_kernels) after `pip install .`.
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "bench"), "--rootdir", str(ROOT),
                           "--collect-only", "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**__import__("os").environ, "FASTDIFF_BENCH_SMOKE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    expected = {f"bench/{p.name}" for p in (ROOT / "bench").glob("bench_*.py")}
    assert expected and expected <= collected, sorted(expected - collected)


def test_ci_smoke_script_runs_the_bench_folder():
    script = (ROOT / "bench" / "ci_smoke.sh").read_text()
    assert "FASTDIFF_BENCH_SMOKE=1" in script and "pytest bench/ --benchmark-disable" in script
