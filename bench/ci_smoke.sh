#!/usr/bin/env bash
# CI: every benchmark still runs. Tiny sizes (FASTDIFF_BENCH_SMOKE=1), each benchmark once and
# untimed (--benchmark-disable); GPU benchmarks skip without a GPU, diffusers comparisons without
# diffusers. A benchmark that errors fails this script. About 1.5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# plain `pytest` (not `python -m pytest`): `-m` would put the source tree, which has no compiled
# core after a non-editable install, ahead of the installed package on sys.path.
FASTDIFF_BENCH_SMOKE=1 pytest bench/ --benchmark-disable -q "$@"
