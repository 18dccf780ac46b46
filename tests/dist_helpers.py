"""Real processes for the distributed tests: a nats-server, workers (``in=dyn://``) and
frontends (``in=http out=dyn``), all on loopback, all stopped at the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from http_helpers import ROOT, Server, free_port


def nats_binary() -> str:
    from dynamo_run.distributed.nats_binary import nats_server_path

    return nats_server_path()


class NatsServer:
    """A nats-server with JetStream on a free loopback port (restartable on the same port)."""

    def __init__(self, token: str | None = None) -> None:
        self.port = free_port()
        self.token = token
        self._tmp = tempfile.TemporaryDirectory(prefix="dynnats-")
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [nats_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js"]
        argv += ["-sd", str(Path(self._tmp.name) / "js")]
        if self.token:
            argv += ["--auth", self.token]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("nats-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        self._tmp.cleanup()


class Worker:
    """``python -m dynamo_run in=dyn://ENDPOINT out=ENGINE [MODEL]`` as a real process."""

    def __init__(
        self,
        nats_url: str,
        out: str = "echo",
        endpoint: str = "dyn://test.backend.generate",
        model: str | None = None,
        engine_args: dict[str, object] | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="dynworker-")
        self.log_path = Path(self._tmp.name) / "worker.log"
        argv = [sys.executable, "-m", "dynamo_run", f"in={endpoint}", f"out={out}"]
        argv += ["--nats-url", nats_url]
        if model:
            argv.append(model)
        if engine_args is not None:
            path = Path(self._tmp.name) / "engine.json"
            path.write_text(json.dumps(engine_args))
            argv += ["--extra-engine-args", str(path)]
        argv += args or []
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "DYN_LEASE_S": "2"}
        full_env.update(env or {})
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.instance_id = ""

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 60.0) -> Worker:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()}")
            for line in self.log().splitlines():
                if " serving " in line and "worker " in line:
                    self.instance_id = line.split("worker ", 1)[1].split()[0]
                    return self
            time.sleep(0.05)
        raise AssertionError(f"worker not ready in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self._tmp.cleanup()


def frontend(nats_url: str, out: str = "dyn", args: list[str] | None = None) -> Server:
    return Server(out=out, args=["--nats-url", nats_url, *(args or [])])


def wait_models(server: Server, wanted: list[str], timeout: float = 30.0) -> list[str]:
    """Poll /v1/models until it lists exactly ``wanted`` (sorted)."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            data = httpx.get(server.url + "/models", timeout=2).json()
            seen = sorted(m["id"] for m in data.get("data", []))
            if seen == sorted(wanted):
                return seen
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"/v1/models lists {seen}, expected {wanted}:\n{server.log()}")
