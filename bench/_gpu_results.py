"""pytest plugin for bench/gpu_check.py's test step: one JSON line per test, written (and flushed)
as each test finishes, so that a step killed by its timeout keeps every verdict reached so far;
and a per-test time limit (FASTDIFF_TEST_TIMEOUT seconds, SIGALRM), so that one hung test costs
one row, not the step.

    pytest -p _gpu_results ...   with FASTDIFF_RESULTS_JSONL=path (bench/ on sys.path)
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

_PATH = os.environ.get("FASTDIFF_RESULTS_JSONL")
_LIMIT = float(os.environ.get("FASTDIFF_TEST_TIMEOUT", "0") or 0)


class TestTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise TestTimeout(f"test exceeded FASTDIFF_TEST_TIMEOUT={_LIMIT:g} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if _LIMIT > 0 and hasattr(signal, "setitimer"):
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, _LIMIT)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    else:
        yield


def pytest_runtest_logreport(report):
    if not _PATH or (report.when != "call" and not (report.when == "setup" and report.outcome != "passed")):
        return
    row = {"test": report.nodeid, "outcome": report.outcome, "seconds": round(report.duration, 3),
           "when": report.when, "time": time.strftime("%H:%M:%S", time.gmtime())}
    if report.outcome == "failed":
        row["message"] = str(report.longrepr)[-1500:]
    elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        row["message"] = str(report.longrepr[2])[:300]
    with open(_PATH, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
