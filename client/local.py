"""Run a heinfer server as a child process on loopback: for the demo and the integration tests.

It starts the same command a container runs (`heinfer serve`, configured by HEINFER_*
environment variables), waits for readiness with a bounded poll, and stops it (SIGTERM, then
SIGKILL for the whole process group it created). Only subprocess and httpx are used here, so the
client package never imports the server.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def heinfer_command() -> list[str]:
    """The `heinfer` console script of this environment (as in the Dockerfile's CMD)."""
    script = Path(sys.executable).parent / "heinfer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "heinfer_client.cli"]


class LocalServer:
    def __init__(self, data_dir: str | Path, *, env: dict[str, str] | None = None,
                 args: list[str] | None = None, command: list[str] | None = None,
                 port: int | None = None, log_path: str | Path | None = None,
                 ready_timeout: float = 90.0, cafile: str | Path | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.extra_env = dict(env or {})
        self.command = command or [*heinfer_command(), "serve"]
        self.args = list(args or [])
        self.log_path = Path(log_path) if log_path else self.data_dir.parent / (
            self.data_dir.name + f".server-{self.port}.log")
        self.ready_timeout = ready_timeout
        # TLS (uvicorn's --ssl-certfile/--ssl-keyfile): https, verified against `cafile`
        self.cafile = str(cafile) if cafile else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.cafile else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> LocalServer:
        env = {**os.environ, "HEINFER_HOST": "127.0.0.1", "HEINFER_PORT": str(self.port),
               "HEINFER_DATA_DIR": str(self.data_dir), **self.extra_env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command + self.args, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        try:
            self.wait_ready()
        except BaseException:  # never leave a half-started server behind
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                verify = ssl.create_default_context(cafile=self.cafile) if self.cafile else True
                r = httpx.get(self.url + "/v1/health/ready", timeout=2, verify=verify)
                if r.status_code == 200:
                    return
                if "start-up failed" in r.text:
                    raise RuntimeError(f"server start-up failed: {r.json().get('detail')}")
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {self.ready_timeout} s:\n{self.log()}")

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9 the server process only (its workers notice and exit by themselves)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # the group we created: pool workers included
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=timeout)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
