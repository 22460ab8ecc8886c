"""Run the service in a child process on a free local port: for tests and benchmarks, which must talk
to a real uvicorn over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`moebert serve` with `models` {name: path} and extra flags; `start()` waits for /health/ready."""

    def __init__(self, models: dict[str, str | Path], *flags: str, env: dict[str, str] | None = None, log=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "moebert_cli", "serve", "--port", str(self.port), "--host", "127.0.0.1"]
        for name, path in models.items():
            args += ["--model", f"{name}={path}"]
        self.args = [*args, *flags]
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        # A file, not a pipe: an unread pipe fills up and blocks the server's logging.
        self.log = log or tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the server)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300.0) -> ServerProcess:
        repo = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            self.args, env=self.env, cwd=repo, stdout=self.log, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout_s} s")

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        self.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        """What the server has logged so far."""
        try:
            self.log.flush()
            self.log.seek(0)
            return self.log.read()
        except (OSError, ValueError, AttributeError):
            return ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
