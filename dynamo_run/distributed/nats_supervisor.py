"""The process that owns the embedded nats-server and stops it when no one uses it any more.

Started by :mod:`dynamo_run.distributed.nats_embedded` in its own session (it outlives the
process that started it) as one of::

    python -m dynamo_run.distributed.nats_supervisor ARGS    # from a virtual environment
    dynamo-run __nats-supervisor ARGS                         # a frozen dynamo-run binary

    ARGS: --dir DIR --nats-server BINARY --config DIR/nats-server.conf --grace SECONDS
          [--poll SECONDS]

It starts ``BINARY -c CONFIG --jetstream`` as its child (the server dies with it), waits until
the server answers, prints one line on stdout,
``READY {"supervisor_pid", "server_pid", "port", "monitor_url"}``, and logs to stderr
(``DIR/supervisor.log``) from then on. It polls the server's ``/varz`` for
its client connections; once there has been none for ``--grace`` seconds it takes the state
lock, checks again, removes ``DIR/server.json``, stops the server (SIGTERM, then SIGKILL) and
exits 0. SIGTERM, SIGINT or SIGHUP stop it the same way at once. A server that dies on its
own is restarted on the same ports (clients reconnect), at most 5 times a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from dynamo_run.distributed.nats_embedded import (
    LOG_LIMIT_BYTES,
    SERVER_LOG,
    DirLock,
    http_json,
    read_state,
    remove_state,
    server_answers,
    write_state,
)

log = logging.getLogger("dynamo_run.distributed.nats_supervisor")

PR_SET_PDEATHSIG = 1
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
MAX_RESTARTS_PER_MINUTE = 5


def _parent_death_signal() -> Any:
    """A preexec_fn that makes the child receive SIGTERM when this process dies (Linux), so a
    supervisor killed with SIGKILL leaves no orphan server behind."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


class Supervisor:
    def __init__(self, directory: Path, binary: str, config: Path, grace: float, poll: float):
        self.directory = directory
        self.binary = binary
        self.config = config
        self.grace = grace
        self.poll = poll
        self.server: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.monitor_url = ""
        self.stop_requested = False
        self.restarts: deque[float] = deque()

    # --- the server process --------------------------------------------------------------------

    def start_server(self) -> None:
        """Start nats-server (on the known ports after the first start); RuntimeError if it
        does not come up."""
        argv = [self.binary, "-c", str(self.config), "--jetstream"]
        if self.port:
            argv += ["-p", str(self.port), "-m", self.monitor_url.rpartition(":")[2]]
        server_log = self.directory / SERVER_LOG
        mode = "wb" if server_log.exists() and server_log.stat().st_size > LOG_LIMIT_BYTES else "ab"
        with open(server_log, mode) as output:
            self.server = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                close_fds=True,
                preexec_fn=_parent_death_signal(),
            )
        pid = self.server.pid
        deadline = time.monotonic() + START_TIMEOUT_S
        ports: dict[str, Any] | None = None
        while ports is None:
            if self.server.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with code {self.server.returncode} at start "
                    f"(see {server_log})"
                )
            if time.monotonic() > deadline:
                self.stop_server()
                raise RuntimeError(f"nats-server did not report its ports in {START_TIMEOUT_S}s")
            for path in self.directory.glob(f"*_{pid}.ports"):
                with contextlib.suppress(OSError, ValueError):
                    ports = json.loads(path.read_text())
            if ports is None:
                time.sleep(0.02)
        self.port = int(ports["nats"][0].rpartition(":")[2])
        self.monitor_url = ports["monitoring"][0].rstrip("/")
        if not server_answers(self.monitor_url, attempts=int(START_TIMEOUT_S / 2.2) + 1):
            self.stop_server()
            raise RuntimeError(f"nats-server does not answer on {self.monitor_url}/healthz")
        log.info(
            "nats-server pid %d: clients on port %d, monitoring %s",
            pid,
            self.port,
            self.monitor_url,
        )

    def stop_server(self) -> None:
        server = self.server
        if server is None:
            return
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("nats-server pid %d ignored SIGTERM: killing it", server.pid)
                server.kill()
                server.wait()
        log.info("nats-server pid %d stopped (exit code %s)", server.pid, server.returncode)
        for path in self.directory.glob(f"*_{server.pid}.ports"):
            path.unlink(missing_ok=True)
        self.server = None

    def connections(self) -> int | None:
        """Clients connected now; None when the server does not answer."""
        try:
            return int(http_json(f"{self.monitor_url}/varz", timeout=2.0)["connections"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # --- the loop ----------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_requested = True

    def _owns_state(self) -> bool:
        state = read_state(self.directory)
        return state is None or state.get("supervisor_pid") == os.getpid()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            self.start_server()
        except (OSError, RuntimeError) as exc:
            log.error("%s", exc)
            return 1
        assert self.server is not None
        ready = {
            "supervisor_pid": os.getpid(),  # a onefile binary's bootloader pid is not this one
            "server_pid": self.server.pid,
            "port": self.port,
            "monitor_url": self.monitor_url,
        }
        sys.stdout.write("READY " + json.dumps(ready) + "\n")
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # the starter stops reading: never write into a closed pipe
        os.close(devnull)
        try:
            return self._loop()
        finally:
            self.stop_server()

    def _loop(self) -> int:
        idle_since: float | None = None
        silent = False
        while True:
            if self.stop_requested:
                log.info("signalled: stopping")
                self._shutdown(timeout=5.0)
                return 0
            if not self._owns_state():
                log.warning("the state file names another supervisor: stopping this server")
                return 0
            if self.server is None or self.server.poll() is not None:
                if not self._restart():
                    return 1
                idle_since = None
                continue
            count = self.connections()
            now = time.monotonic()
            if count is None:
                if not silent:
                    log.warning("nats-server does not answer on %s", self.monitor_url)
                silent = True
            else:
                silent = False
                if count > 0:
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                elif now - idle_since >= self.grace and self._stop_if_idle():
                    return 0
            time.sleep(self.poll)

    def _stop_if_idle(self) -> bool:
        """Under the lock (a client connecting holds it), stop if still no one is connected."""
        lock = DirLock(self.directory)
        if not lock.try_acquire(0):
            return False
        try:
            if self.connections() != 0:
                return False
            log.info("no client for %gs: stopping", self.grace)
            remove_state(self.directory, os.getpid())
            self.stop_server()
            return True
        finally:
            lock.release()

    def _shutdown(self, timeout: float) -> None:
        lock = DirLock(self.directory)
        locked = lock.try_acquire(timeout)
        try:
            remove_state(self.directory, os.getpid())
            self.stop_server()
        finally:
            if locked:
                lock.release()

    def _restart(self) -> bool:
        if self.server is not None:
            log.warning(
                "nats-server pid %d exited (code %s)", self.server.pid, self.server.returncode
            )
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > 60:
            self.restarts.popleft()
        lock = DirLock(self.directory)
        locked = lock.try_acquire(10.0)
        try:
            if len(self.restarts) >= MAX_RESTARTS_PER_MINUTE:
                log.error("nats-server died %d times in a minute: giving up", len(self.restarts))
                remove_state(self.directory, os.getpid())
                return False
            self.restarts.append(now)
            try:
                self.start_server()
            except (OSError, RuntimeError) as exc:
                log.error("restarting nats-server failed: %s", exc)
                remove_state(self.directory, os.getpid())
                return False
            state = read_state(self.directory)
            assert self.server is not None
            if state is not None and state.get("supervisor_pid") == os.getpid():
                state["server_pid"] = self.server.pid
                write_state(self.directory, state)
            return True
        finally:
            if locked:
                lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dynamo-run __nats-supervisor", description=__doc__)
    parser.add_argument("--dir", required=True, type=Path, help="the NATS state directory")
    parser.add_argument("--nats-server", required=True, help="the nats-server binary")
    parser.add_argument("--config", required=True, type=Path, help="nats-server config file")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds idle before stopping")
    parser.add_argument("--poll", type=float, help="seconds between connection counts")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s nats-supervisor[%(process)d] %(levelname)s: %(message)s",
    )
    poll = args.poll if args.poll else min(1.0, max(0.1, args.grace / 5))
    supervisor = Supervisor(args.dir.resolve(), args.nats_server, args.config, args.grace, poll)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
