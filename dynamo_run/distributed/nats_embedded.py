"""Find, start and share the embedded ``nats-server`` of this host.

Every dynamo-run process on a host that needs NATS and was given no ``--nats-url`` uses one
embedded server. Its state lives in one directory (:func:`state_dir`), mode 0700::

    lock              flock(2) target; never removed, so every process locks the same inode
    server.json       the state file, mode 0600: pids, port, URL, listen address, token
    nats-server.conf  the server's configuration, mode 0600 (it holds the token)
    store/            the JetStream store
    supervisor.log    the supervisor's log; nats-server.log: the server's own

Protocol (every step below runs with ``lock`` held):

- a process reads ``server.json``; if the supervisor and the server it names are alive and
  the server answers its monitoring endpoint, the process connects to it (still holding the
  lock, so the server cannot stop between the check and the connection) and releases the lock;
- otherwise the stale server is stopped, a supervisor (``nats_supervisor``) is started in its
  own session, starts ``nats-server`` as its child and reports the ports; the process writes
  ``server.json``, connects, and releases the lock;
- the supervisor polls the server's client-connection count; once it has been 0 for the
  grace period it takes the lock, checks the count again, removes ``server.json``, stops the
  server and exits. A client killed with SIGKILL drops its TCP connection, so it counts too.

Only the standard library is used here: the supervisor imports this module and starts fast.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import selectors
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_run.distributed.errors import NatsError
from dynamo_run.distributed.nats_binary import nats_server_path

__all__ = ["DirLock", "EmbeddedServer", "NatsError", "find_or_start_server", "state_dir"]

log = logging.getLogger("dynamo_run.distributed.nats")

ENV_DIR = "DYN_NATS_DIR"  # state directory override (tests isolate themselves with it)
ENV_GRACE = "DYN_NATS_GRACE_S"  # seconds without clients before the server stops
SUPERVISOR_ARG = "__nats-supervisor"  # argv[1] that makes a frozen dynamo-run a supervisor

STATE_FILE = "server.json"
LOCK_FILE = "lock"
CONFIG_FILE = "nats-server.conf"
STORE_DIR = "store"
SUPERVISOR_LOG = "supervisor.log"
SERVER_LOG = "nats-server.log"

DEFAULT_GRACE_S = 5.0
LOCK_TIMEOUT_S = 60.0
START_TIMEOUT_S = 20.0
STATE_VERSION = 1
LOG_LIMIT_BYTES = 1 << 20  # logs over this size start afresh at the next start


@dataclass(frozen=True)
class EmbeddedServer:
    """The embedded server a process uses, as read from (or written to) ``server.json``."""

    url: str  # what local processes connect to, without credentials: nats://127.0.0.1:PORT
    port: int
    listen: str | None  # HOST:PORT it was asked to listen on for other hosts; None: loopback
    token: str | None  # token every client must present; None: no auth (loopback only)
    server_pid: int
    supervisor_pid: int
    monitor_url: str  # http://127.0.0.1:PORT of the monitoring endpoint
    directory: Path
    started: bool  # True when this process started it, False when it reused it

    @property
    def share_url(self) -> str | None:
        """``nats://TOKEN@HOST:PORT`` for other hosts (``--nats-url``); None when loopback-only.

        A wildcard listen host (0.0.0.0, ::) is replaced by this host's name.
        """
        if self.listen is None:
            return None
        host, port = parse_listen(self.listen)
        if host in ("", "0.0.0.0", "::"):
            import socket

            host = socket.getfqdn() or socket.gethostname()
        port = port or self.port
        auth = f"{self.token}@" if self.token else ""
        return f"nats://{auth}{_bracket(host)}:{port}"

    @classmethod
    def from_state(cls, state: dict[str, Any], directory: Path, started: bool) -> EmbeddedServer:
        return cls(
            url=state["url"],
            port=int(state["port"]),
            listen=state.get("listen"),
            token=state.get("token"),
            server_pid=int(state["server_pid"]),
            supervisor_pid=int(state["supervisor_pid"]),
            monitor_url=state["monitor_url"],
            directory=directory,
            started=started,
        )


# --- where things are ------------------------------------------------------------------------


def state_dir() -> Path:
    """The state directory: ``$DYN_NATS_DIR``, else ``$XDG_RUNTIME_DIR/dynamo-run/nats``, else
    ``~/.local/state/dynamo-run/nats``."""
    override = os.environ.get(ENV_DIR)
    if override:
        return Path(override).expanduser()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "dynamo-run" / "nats"
    return Path.home() / ".local" / "state" / "dynamo-run" / "nats"


def grace_seconds() -> float:
    """Seconds without clients before the embedded server stops (``DYN_NATS_GRACE_S``)."""
    value = os.environ.get(ENV_GRACE)
    if not value:
        return DEFAULT_GRACE_S
    try:
        grace = float(value)
    except ValueError:
        raise NatsError(f"{ENV_GRACE}={value!r} is not a number of seconds") from None
    if grace < 0:
        raise NatsError(f"{ENV_GRACE}={value!r} must not be negative")
    return grace


def supervisor_command(*args: str) -> list[str]:
    """argv that runs the supervisor: a module of this interpreter, or the frozen binary."""
    if getattr(sys, "frozen", False):
        return [sys.executable, SUPERVISOR_ARG, *args]
    return [sys.executable, "-m", "dynamo_run.distributed.nats_supervisor", *args]


# --- small helpers shared with the supervisor ---------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); NatsError when malformed."""
    host, sep, port_text = listen.strip().rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise NatsError(f"NATS listen address {listen!r} is not HOST:PORT")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        host = "0.0.0.0"
    return host, int(port_text)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _local_host(host: str) -> str:
    """Address local processes use to reach a server listening on ``host``."""
    if host in ("", "0.0.0.0", "::", "localhost") or host.startswith("127."):
        return "127.0.0.1"
    if host == "::1":
        return "::1"
    return host


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, counts as dead)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (or it just exited): trust kill(0)
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def pid_runs(pid: int | None, needle: str) -> bool:
    """Whether ``pid`` is alive and its command line contains ``needle`` (a reused pid does
    not); where there is no procfs, alive is enough."""
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return False
    return needle.encode() in cmdline


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def terminate_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM ``pid``, then SIGKILL if it is still there after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_pid_gone(pid, timeout):
            return


def http_json(url: str, timeout: float = 2.0) -> dict[str, Any]:
    """GET a monitoring endpoint (never through a proxy) and decode its JSON."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        return json.loads(response.read())


def server_answers(monitor_url: str, attempts: int = 3, timeout: float = 2.0) -> bool:
    """Whether the server's /healthz says ok (retried: a busy host may answer slowly)."""
    for attempt in range(attempts):
        try:
            if http_json(f"{monitor_url}/healthz", timeout=timeout).get("status") == "ok":
                return True
        except (OSError, ValueError, urllib.error.URLError):
            pass
        if attempt + 1 < attempts:
            time.sleep(0.2)
    return False


def ensure_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        if directory.stat().st_uid == os.getuid():
            directory.chmod(0o700)


def read_state(directory: Path) -> dict[str, Any] | None:
    """The state file's content; None when it is missing or unreadable (a torn file is
    impossible: it is replaced atomically)."""
    try:
        state = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("version") == STATE_VERSION else None


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_state(directory: Path, state: dict[str, Any]) -> None:
    write_private(directory / STATE_FILE, json.dumps(state, indent=1) + "\n")


def remove_state(directory: Path, supervisor_pid: int | None = None) -> None:
    """Remove the state file (only if it names ``supervisor_pid``, when given)."""
    if supervisor_pid is not None:
        state = read_state(directory)
        if state is not None and state.get("supervisor_pid") != supervisor_pid:
            return
    with contextlib.suppress(FileNotFoundError):
        (directory / STATE_FILE).unlink()


class DirLock:
    """An exclusive flock(2) on ``DIR/lock``, held across processes (and across threads or
    coroutines of one process: each DirLock opens its own descriptor)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None

    def acquire(self, timeout: float = LOCK_TIMEOUT_S) -> None:
        """Block until locked; NatsError after ``timeout`` seconds."""
        if not self.try_acquire(timeout):
            raise NatsError(
                f"timed out after {timeout:.0f}s waiting for the NATS state lock "
                f"{self.directory / LOCK_FILE}"
            )

    def try_acquire(self, timeout: float = 0.0) -> bool:
        ensure_dir(self.directory)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
                continue
            self._fd = fd
            return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- find or start (the caller holds the DirLock) ----------------------------------------------


def find_or_start_server(
    directory: Path,
    listen: str | None = None,
    token: str | None = None,
    grace_s: float | None = None,
) -> EmbeddedServer:
    """The running embedded server, or a new one. The caller must hold ``DirLock(directory)``
    until its client has connected (so the server cannot stop in between).

    ``listen``: ``HOST:PORT`` to make the server reachable from other hosts (token auth on:
    ``token``, or a generated one). ``token``: require this token from every client.
    ``grace_s``: seconds without clients before a server started here stops.
    NatsError when a running server does not match ``listen``/``token``, or none can start.
    """
    if listen is not None:
        parse_listen(listen)  # validate early
    state = read_state(directory)
    if state is not None:
        if _state_healthy(state):
            _check_compatible(state, listen, token)
            server = EmbeddedServer.from_state(state, directory, started=False)
            log.info(
                "using the embedded NATS server already running at %s (pid %d; state in %s)",
                server.url,
                server.server_pid,
                directory,
            )
            return server
        log.warning(
            "the embedded NATS server in %s is gone or does not answer (pid %s): starting a new one",
            directory,
            state.get("server_pid"),
        )
        _stop_stale(directory, state)
        # Clients of the lost server keep reconnecting to its port: come back on it when
        # nothing else was asked for.
        if listen is None and token is None:
            listen, token = state.get("listen"), state.get("token")
        preferred = int(state.get("port") or 0)
    else:
        (directory / STATE_FILE).unlink(missing_ok=True)  # unreadable: replace it
        preferred = 0
    return _start(
        directory, listen, token, grace_seconds() if grace_s is None else grace_s, preferred
    )


def find_running_server(directory: Path) -> EmbeddedServer | None:
    """The running embedded server (never starts one); None when there is none. The caller
    must hold ``DirLock(directory)`` until its client has connected."""
    state = read_state(directory)
    if state is None or not _state_healthy(state):
        return None
    return EmbeddedServer.from_state(state, directory, started=False)


def _state_healthy(state: dict[str, Any]) -> bool:
    try:
        supervisor, server = int(state["supervisor_pid"]), int(state["server_pid"])
        monitor_url = state["monitor_url"]
    except (KeyError, TypeError, ValueError):
        return False
    if not pid_alive(supervisor) or not pid_alive(server):
        return False
    return server_answers(monitor_url)


def _check_compatible(state: dict[str, Any], listen: str | None, token: str | None) -> None:
    where = f"{state['url']} (pid {state['server_pid']})"
    running = state.get("listen")
    if listen is not None:
        if running is None:
            raise NatsError(
                f"an embedded NATS server is already running on {where}, loopback only; it "
                f"cannot also listen on {listen}: stop the dynamo-run processes using it first"
            )
        want_host, want_port = parse_listen(listen)
        have_host, have_port = parse_listen(running)
        if want_host != have_host or want_port not in (0, have_port, int(state["port"])):
            raise NatsError(
                f"an embedded NATS server is already running on {where}, listening on "
                f"{running}; it cannot also listen on {listen}"
            )
    if token is not None and state.get("token") != token:
        raise NatsError(
            f"an embedded NATS server is already running on {where} with a different token"
        )


def _stop_stale(directory: Path, state: dict[str, Any]) -> None:
    supervisor = state.get("supervisor_pid")
    if isinstance(supervisor, int) and pid_runs(supervisor, "supervisor"):
        terminate_pid(supervisor)  # it stops its server itself
    server = state.get("server_pid")
    if isinstance(server, int) and pid_runs(server, "nats-server"):
        terminate_pid(server)
    remove_state(directory)


def _nats_string(value: str) -> str:
    return json.dumps(value)  # the NATS config format reads JSON strings


def _write_config(directory: Path, host: str, port: int, token: str | None) -> Path:
    lines = [
        "# Written by dynamo-run for its embedded nats-server; regenerated at every start.",
        f"listen: {_nats_string(f'{_bracket(host)}:{port if port else -1}')}",
        'http: "127.0.0.1:-1"',
        f"jetstream {{ store_dir: {_nats_string(str(directory / STORE_DIR))} }}",
        f"ports_file_dir: {_nats_string(str(directory))}",
    ]
    if token is not None:
        lines.append(f"authorization {{ token: {_nats_string(token)} }}")
    path = directory / CONFIG_FILE
    write_private(path, "\n".join(lines) + "\n")
    return path


def _start(
    directory: Path, listen: str | None, token: str | None, grace_s: float, preferred_port: int
) -> EmbeddedServer:
    if listen is not None:
        host, port = parse_listen(listen)
        if token is None:
            token = secrets.token_urlsafe(24)
    else:
        host, port = "127.0.0.1", preferred_port
    if token is not None and (not token or any(c.isspace() or c in "\"'" for c in token)):
        raise NatsError("the NATS token must be non-empty, without spaces or quotes")
    binary = nats_server_path()
    store = directory / STORE_DIR
    store.mkdir(mode=0o700, exist_ok=True)
    try:
        ready = _spawn_supervisor(directory, binary, host, port, token, grace_s)
    except NatsError:
        if listen is not None or not port:
            raise
        log.info("port %d is not free any more: starting on a new port", port)
        ready = _spawn_supervisor(directory, binary, host, 0, token, grace_s)
    local = _bracket(_local_host(host))
    state = {
        "version": STATE_VERSION,
        "supervisor_pid": ready["supervisor_pid"],
        "server_pid": ready["server_pid"],
        "port": ready["port"],
        "url": f"nats://{local}:{ready['port']}",
        "listen": listen,
        "token": token,
        "monitor_url": ready["monitor_url"],
        "store_dir": str(store),
        "binary": binary,
        "started_at": time.time(),
    }
    write_state(directory, state)
    server = EmbeddedServer.from_state(state, directory, started=True)
    where = f"listening on {listen}, token auth" if listen else "loopback only"
    log.info(
        "started the embedded NATS server at %s (%s; pid %d, JetStream store %s; it stops "
        "%gs after its last client leaves)",
        server.url,
        where,
        server.server_pid,
        store,
        grace_s,
    )
    return server


def _spawn_supervisor(
    directory: Path, binary: str, host: str, port: int, token: str | None, grace_s: float
) -> dict[str, Any]:
    config = _write_config(directory, host, port, token)
    argv = supervisor_command(
        "--dir", str(directory), "--nats-server", binary, "--config", str(config),
        "--grace", repr(grace_s),
    )  # fmt: skip
    env = dict(os.environ)
    if getattr(sys, "frozen", False):
        # A onefile binary must not reuse this process's unpacked files: they are deleted
        # when this process exits, and the supervisor outlives it.
        env["PYINSTALLER_RESET_ENVIRONMENT"] = "1"
    else:
        # The supervisor runs with cwd=directory: make sure it imports this same package.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    log_path = directory / SUPERVISOR_LOG
    big = log_path.exists() and log_path.stat().st_size > LOG_LIMIT_BYTES
    with open(log_path, "wb" if big else "ab") as errors:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            cwd=directory,
            env=env,
            start_new_session=True,  # Ctrl-C in the terminal of the starter does not reach it
            close_fds=True,
        )
    # Reap it whenever it exits, so that its pid never lingers as a zombie of this process.
    threading.Thread(target=proc.wait, name="nats-supervisor-reaper", daemon=True).start()
    assert proc.stdout is not None
    line = _read_line(proc.stdout, START_TIMEOUT_S)
    proc.stdout.close()
    if line.startswith("READY "):
        try:
            ready = json.loads(line[len("READY ") :])
            ready.setdefault("supervisor_pid", proc.pid)
            return ready
        except ValueError:
            pass
    if proc.poll() is None:
        terminate_pid(proc.pid)
    reason = _last_line(directory / SUPERVISOR_LOG) or _last_line(directory / SERVER_LOG)
    raise NatsError(
        f"the embedded nats-server did not start ({reason or 'no reason logged'}; "
        f"see {directory / SUPERVISOR_LOG})"
    )


def _read_line(stream: Any, timeout: float) -> str:
    """One line from a pipe, or what came before EOF or the timeout."""
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                break
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").split("\n", 1)[0]


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 4096))
            lines = file.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def stop_embedded_server(directory: Path | None = None, timeout: float = 10.0) -> bool:
    """Stop the embedded server of ``directory`` now, whoever uses it (for operators and
    tests); returns whether one was running."""
    directory = state_dir() if directory is None else directory
    with DirLock(directory):
        state = read_state(directory)
        if state is None:
            return False
        supervisor = state.get("supervisor_pid")
        if isinstance(supervisor, int) and pid_runs(supervisor, "supervisor"):
            os.kill(supervisor, signal.SIGTERM)
    # The supervisor takes the lock to remove the state: wait for it outside the lock.
    if isinstance(supervisor, int) and not wait_pid_gone(supervisor, timeout):
        terminate_pid(supervisor, 0.1)
    with DirLock(directory):
        current = read_state(directory)
        if current is not None and current.get("supervisor_pid") == supervisor:
            _stop_stale(directory, current)  # it did not clean up after itself
    return True
