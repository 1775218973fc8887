"""``tools/profile_resume.py``, whose output ``docs/performance.md`` quotes, runs and prints every phase."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_the_resume_profile_prints_each_phase_a_total_and_mlx_lm():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "profile_resume.py"), "--tokens", "300", "--rounds", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("warm resume, 300 cached tokens + 1 new, median of 3 rounds")
    values = {line[:24].strip(): float(line[24:]) for line in lines[1:]}
    phases = ["submit", "to the forward pass", "forward graph", "forward compute", "to the token event"]
    assert list(values) == [*phases, "total", "mlx-lm kept cache"]
    assert all(values[p] > 0 for p in phases) and values["mlx-lm kept cache"] > 0
