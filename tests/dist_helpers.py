"""Real processes for the distributed tests: a nats-server, workers (``in=dyn://``) and
frontends (``in=http out=dyn``), all on loopback, all stopped at the end; and two simulated
hosts (network namespaces joined by a veth pair) to run them on."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from http_helpers import ROOT, Server, free_port


def nats_binary() -> str:
    from dynamo_run.distributed.nats_binary import nats_server_path

    return nats_server_path()


class NatsServer:
    """A nats-server with JetStream (unless ``jetstream=False``) on a free loopback port
    (restartable on the same port)."""

    def __init__(self, token: str | None = None, jetstream: bool = True) -> None:
        self.port = free_port()
        self.token = token
        self.jetstream = jetstream
        self._tmp = tempfile.TemporaryDirectory(prefix="dynnats-")
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [nats_binary(), "-a", "127.0.0.1", "-p", str(self.port)]
        if self.jetstream:
            argv += ["-js", "-sd", str(Path(self._tmp.name) / "js")]
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


def frontend(
    nats_url: str,
    out: str = "dyn",
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    return Server(out=out, args=["--nats-url", nats_url, *(args or [])], env=env)


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


# --- two hosts on one machine -----------------------------------------------------------------


def netns_exec(netns: str | None) -> list[str]:
    """argv prefix that runs a command inside network namespace ``netns`` (none: here)."""
    return ["ip", "netns", "exec", netns] if netns else []


class NetnsUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no ``ip``, no CAP_SYS_ADMIN...)."""


class NetnsHosts:
    """Two simulated hosts: network namespaces ``a`` and ``b`` joined by a veth pair.

    Each has its loopback up and one address on the link (``addr_a``/``addr_b`` in a private
    /30 that exists only inside the two namespaces: nothing is added to this machine's own
    network). :meth:`close` kills every process left inside them and deletes them.
    """

    def __init__(self, tag: str, subnet: str = "10.231.0") -> None:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the `ip` command (iproute2) is not installed")
        self.a = f"dyn-a-{tag}"
        self.b = f"dyn-b-{tag}"
        self.addr_a = f"{subnet}.1"
        self.addr_b = f"{subnet}.2"
        self._made: list[str] = []
        try:
            for name in (self.a, self.b):
                self._ip("netns", "add", name)
                self._made.append(name)
            # Both ends are created inside the namespaces: none ever appears on this host.
            self._ip("link", "add", "veth0", "netns", self.a, "type", "veth",
                     "peer", "name", "veth0", "netns", self.b)  # fmt: skip
            for name, addr in ((self.a, self.addr_a), (self.b, self.addr_b)):
                self._ip("-n", name, "addr", "add", f"{addr}/30", "dev", "veth0")
                self._ip("-n", name, "link", "set", "lo", "up")
                self._ip("-n", name, "link", "set", "veth0", "up")
        except NetnsUnavailable:
            self.close()
            raise

    @staticmethod
    def _ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            reason = done.stderr.strip() or f"exit {done.returncode}"
            raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {reason}")

    def pids(self, netns: str) -> list[int]:
        """The processes running inside ``netns``."""
        done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
        return [int(word) for word in done.stdout.split() if word.isdigit()]

    def close(self) -> None:
        """Kill every process inside the namespaces (by pid), then delete them."""
        for name in self._made:
            deadline = time.monotonic() + 10
            while (pids := self.pids(name)) and time.monotonic() < deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)
        self._made.clear()


class DynProcess:
    """``python -m dynamo_run ARGS`` as a real process, optionally inside a network namespace,
    its output (stdout and stderr) in a log file."""

    def __init__(
        self, args: list[str], netns: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="dynproc-")
        self.log_path = Path(self._tmp.name) / "process.log"
        argv = [*netns_exec(netns), sys.executable, "-m", "dynamo_run", *args]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        full_env.pop("DYN_API_KEY", None)
        full_env.update(env or {})
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """The first match of ``pattern`` in the output; fails if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.proc.poll() is not None
            found = re.search(pattern, self.log())
            if found:
                return found
            if exited:
                raise AssertionError(f"exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
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


class Worker(DynProcess):
    """``python -m dynamo_run in=dyn://ENDPOINT out=ENGINE [MODEL]`` as a real process
    (``netns``: run inside that network namespace, e.g. a host of :class:`NetnsHosts`)."""

    def __init__(
        self,
        nats_url: str,
        out: str = "echo",
        endpoint: str = "dyn://test.backend.generate",
        model: str | None = None,
        engine_args: dict[str, object] | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> None:
        argv = [f"in={endpoint}", f"out={out}", "--nats-url", nats_url]
        if model:
            argv.append(model)
        self._args_dir = tempfile.TemporaryDirectory(prefix="dynworker-")
        if engine_args is not None:
            path = Path(self._args_dir.name) / "engine.json"
            path.write_text(json.dumps(engine_args))
            argv += ["--extra-engine-args", str(path)]
        argv += args or []
        super().__init__(argv, netns=netns, env={"DYN_LEASE_S": "2", **(env or {})})
        self.instance_id = ""

    def wait_ready(self, timeout: float = 60.0) -> Worker:
        """Until the worker says it serves; remembers its instance id."""
        self.instance_id = self.wait_for(r"worker (\w+) serving ", timeout)[1]
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        return super().stop(sig, timeout)

    def cleanup(self) -> None:
        super().cleanup()
        self._args_dir.cleanup()


def start_procs() -> Iterator[list]:
    """Fixture body: every process a test starts (Worker, Server, DynProcess), killed at the
    end whatever happened."""
    started: list = []
    yield started
    for proc in started:
        proc.cleanup()


def start_nats() -> Iterator[NatsServer]:
    """Fixture body: one nats-server for a test module, stopped at the end."""
    server = NatsServer()
    try:
        yield server
    finally:
        server.cleanup()
