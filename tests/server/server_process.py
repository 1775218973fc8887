"""Start ``blockpool serve`` (or ``mlx_lm.server``) as a user does: a subprocess on a free loopback port.

Shared by the server tests and the server benchmarks.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def wait_until(predicate: Any, timeout: float = 30.0) -> Any:
    """Poll ``predicate`` until it returns something true (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not reached within {timeout} s")


def concurrently(function: Any, calls: list[tuple]) -> list[BaseException]:
    """Run ``function(*args)`` for every ``args`` in ``calls`` on its own thread; the exceptions raised."""
    errors: list[BaseException] = []

    def run(args: tuple) -> None:
        try:
            function(*args)
        except BaseException as e:  # handed back to the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(args,)) for args in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def stop_all(servers: list[ServerProcess]) -> None:
    """Stop each server (kill the ones that will not stop)."""
    for server in servers:
        try:
            server.stop(timeout=60)
        except Exception:
            server.kill()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server subprocess, its port and its log.

    Args:
        command: The command line, without ``--host``/``--port``.
        log_path: Where stdout and stderr go.
        health: The path polled until it answers 200.
    """

    def __init__(self, command: list[str], log_path: Path, health: str = "/health", env: dict | None = None):
        self.port = free_port()
        self.command = [*command, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path, self.health = Path(log_path), health
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @classmethod
    def blockpool(
        cls, model_dir: Path, cache_dir: Path, log_path: Path, *flags: str, launch: list[str] | None = None
    ) -> ServerProcess:
        """``python -m blockpool serve`` (under ``launch``, e.g. an ``mlx.launch`` prefix, when given)."""
        command = [
            sys.executable,
            "-m",
            "blockpool",
            "serve",
            "--model",
            str(model_dir),
            "--cache-dir",
            str(cache_dir),
            *flags,
        ]
        return cls([*(launch or []), *command], log_path)

    @classmethod
    def mlx_lm(cls, model_dir: Path, log_path: Path, *flags: str) -> ServerProcess:
        """``python -m mlx_lm.server`` on the same model."""
        return cls(
            [sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir), *flags], log_path, health="/health"
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> ServerProcess:
        """Start it and wait until it answers; raise with its log if it dies first."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                status, _ = self.request("GET", self.health, timeout=2)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server did not answer within {timeout} s:\n{self.log()[-4000:]}")

    def request(
        self, method: str, path: str, body: Any = None, headers: dict | None = None, timeout: float = 120
    ) -> tuple[int, Any]:
        """One HTTP request; ``body`` is JSON-encoded unless it is bytes. Returns (status, parsed JSON or text)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            raw = response.read()
            self.last_headers = dict(response.getheaders())
            try:
                return response.status, json.loads(raw)
            except ValueError:
                return response.status, raw.decode(errors="replace")
        finally:
            connection.close()

    def openai(self, **kwargs: Any) -> Any:
        """An ``openai.OpenAI`` client for this server (no retries)."""
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="not-needed", max_retries=0, timeout=120, **kwargs)

    def anthropic(self) -> Any:
        """An ``anthropic.Anthropic`` client for this server (no retries)."""
        import anthropic

        return anthropic.Anthropic(base_url=self.base_url, api_key="not-needed", max_retries=0, timeout=120)

    def signal(self, sig: int) -> None:
        """Send a signal to the server process."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        """Wait for the process to end; its exit status."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._log.closed:
            self._log.close()

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
