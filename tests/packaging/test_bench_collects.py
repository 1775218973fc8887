"""The benchmark gate's command line works with the project's pytest settings.

pytest-benchmark turns itself off whenever xdist's ``--dist`` is set, and then
refuses ``--benchmark-only``; a ``--dist`` in ``addopts`` once broke CI's gate
while the suite itself passed.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_collects_with_benchmark_only():
    # As CI runs it: not inside an xdist worker (whose PYTEST_XDIST_WORKER would switch benchmarks off).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--benchmark-only", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tests collected" in run.stdout
