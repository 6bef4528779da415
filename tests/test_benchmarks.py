"""Every benchmarks/*.py runs with --smoke (tiniest shapes, 1-2 timed calls) on CPU and prints a
ratio line. A new benchmark script is covered without touching this file."""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))
# "ratio kd / (student + teacher) = 0.912", "memory ratio chunked/naive (peak): 0.147", ...
RATIO = re.compile(r"^.*\bratio\b.*[=:]\s*-?\d+\.\d+", re.MULTILINE)


def test_benchmarks_found():
    assert SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_benchmark_smoke(script):
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    # A fresh interpreter on CPU (conftest's 8 fake devices are an in-process setting).
    env = {**os.environ, "PYTHONPATH": pythonpath, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, script, "--smoke"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    log = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, log
    assert RATIO.search(proc.stdout), log
