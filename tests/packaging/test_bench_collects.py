"""The benchmark gate's command line works with the project's pytest settings.

pytest-benchmark turns itself off whenever xdist's ``--dist`` is set, and then
refuses ``--benchmark-only``; a ``--dist`` in ``addopts`` once broke CI's gate
while the suite itself passed.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_collects_with_benchmark_only():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--benchmark-only", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tests collected" in run.stdout
