"""Start ``dynamo-run in=http`` as a real process on a free loopback port, for the HTTP tests.

Import the fixtures into a test module (``from http_helpers import echo_server_fixture``); the
server is stopped with SIGTERM at the end and its exit code checked.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MODEL_NAME = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``python -m dynamo_run in=http`` process. ``url`` is its base URL (…/v1)."""

    def __init__(
        self,
        out: str = "echo",
        args: list[str] | None = None,
        engine_args: dict[str, object] | None = None,
        env: dict[str, str] | None = None,
        scheme: str = "http",
    ) -> None:
        self.port = free_port()
        self.scheme = scheme
        self.root = f"{scheme}://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        self._tmp = tempfile.TemporaryDirectory(prefix="dynhttp-")
        self.log_path = Path(self._tmp.name) / "server.log"
        argv = [PYTHON, "-m", "dynamo_run", "in=http", f"out={out}", "--http-port", str(self.port)]
        if engine_args is not None:
            path = Path(self._tmp.name) / "engine.json"
            path.write_text(json.dumps(engine_args))
            argv += ["--extra-engine-args", str(path)]
        argv += args or []
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        full_env.pop("DYN_API_KEY", None)  # only the tests that want a key set one
        full_env.update(env or {})
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 60.0, verify: ssl.SSLContext | bool = True) -> None:
        """Poll /health until 200; fail with the server's log if it dies or times out."""
        deadline = time.monotonic() + timeout
        with httpx.Client(verify=verify, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
                try:
                    if client.get(self.root + "/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise AssertionError(f"server not ready in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` and wait; returns the exit code (kills it if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self._tmp.cleanup()

    def metrics(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value}."""
        text = httpx.get(self.root + "/metrics", timeout=5.0, verify=False).text
        return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(found.get(k) == v for k, v in labels.items()):
            total += value
    return total


def start_server(**kwargs: object) -> Iterator[Server]:
    server = Server(**kwargs)  # type: ignore[arg-type]
    try:
        server.wait_ready()
        yield server
        code = server.stop()
        assert code == 0, f"server exited {code}:\n{server.log()}"
    finally:
        server.cleanup()


@pytest.fixture(scope="module", name="echo_server")
def echo_server_fixture() -> Iterator[Server]:
    """Echo engine without delay: exact, instant answers."""
    yield from start_server(engine_args={"delay_ms": 0})


@pytest.fixture(scope="module", name="slow_echo_server")
def slow_echo_server_fixture() -> Iterator[Server]:
    """Echo engine at 50 ms per token: long enough to hang up mid-answer."""
    yield from start_server(engine_args={"delay_ms": 50})
