"""Run the ``blockpool`` command in a subprocess, as a user does."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m blockpool ARGS`` with the current environment plus ``env_extra``."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "blockpool", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
