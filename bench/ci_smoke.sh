#!/usr/bin/env bash
# CI: every benchmark still runs. Tiny sizes (FASTDIFF_BENCH_SMOKE=1), each benchmark once and
# untimed (--benchmark-disable); GPU benchmarks skip without a GPU, diffusers comparisons without
# diffusers. A benchmark that errors fails this script. About 1.5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
FASTDIFF_BENCH_SMOKE=1 python -m pytest bench/ --benchmark-disable -q "$@"
