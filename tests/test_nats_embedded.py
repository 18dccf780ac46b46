"""The embedded nats-server: one per host, shared, stopped after its last client; token auth;
--nats-url servers used as they are. Real nats-server processes, real client processes.

Every test has its own DYN_NATS_DIR under tmp_path and a 1 s grace period; at the end every
process whose command line names that directory (supervisor, nats-server) and every helper
process is stopped, pass or fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, free_port

from dynamo_run.distributed.nats_binary import nats_server_path
from dynamo_run.distributed.nats_connect import NatsError, connect_nats
from dynamo_run.distributed.nats_embedded import STATE_FILE, pid_alive, read_state

pytestmark = pytest.mark.timeout(60)

HELPER = Path(__file__).with_name("nats_helper.py")
GRACE_S = 1.0
# The grace period, the supervisor's poll and a loaded 2-core machine's latency.
STOP_WITHIN_S = GRACE_S + 4.0


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until true; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def pids_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline and pid_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


class Helper:
    """tests/nats_helper.py as a subprocess: one JSON line per event on stdout."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def event(self, timeout: float = 20) -> dict:
        line = self.lines.get(timeout=timeout)
        assert line, f"helper exited with code {self.proc.wait()}"
        return json.loads(line)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def ping(self) -> bool:
        self.send("ping")
        return self.event()["pong"]

    def quit(self) -> int:
        self.send("quit")
        return self.proc.wait(10)


class NatsEnv:
    """One test's NATS directory, its environment, and the processes to stop afterwards."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.env = {**os.environ, "DYN_NATS_DIR": str(directory), "DYN_NATS_GRACE_S": str(GRACE_S)}
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
        )
        self.helpers: list[Helper] = []
        self.others: list[subprocess.Popen] = []

    def helper(self, *args: str) -> Helper:
        helper = Helper(self.env, *args)
        self.helpers.append(helper)
        return helper

    def state(self) -> dict | None:
        return read_state(self.dir)

    def servers(self) -> list[int]:
        """nats-server processes using this directory."""
        return [pid for pid in pids_naming(str(self.dir)) if b"nats-server\0-c" in _cmdline(pid)]

    def cleanup(self) -> None:
        for helper in self.helpers:
            if helper.proc.poll() is None:
                helper.proc.kill()
            helper.proc.wait(10)
        for proc in self.others:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for pid in pids_naming(str(self.dir)):
            os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture()
def nats_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsEnv]:
    env = NatsEnv(tmp_path / "nats")
    monkeypatch.setenv("DYN_NATS_DIR", str(env.dir))
    monkeypatch.setenv("DYN_NATS_GRACE_S", str(GRACE_S))
    try:
        yield env
    finally:
        env.cleanup()


def test_second_process_reuses_the_server(nats_env: NatsEnv) -> None:
    first = nats_env.helper()
    one = first.event()
    assert one["embedded"] and one["started"]
    assert one["url"] == f"nats://127.0.0.1:{one['port']}"
    second = nats_env.helper()
    two = second.event()
    assert not two["started"]
    assert (two["port"], two["server_pid"]) == (one["port"], one["server_pid"])
    assert nats_env.servers() == [one["server_pid"]]
    state_file = nats_env.dir / STATE_FILE
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert json.loads(state_file.read_text())["server_pid"] == one["server_pid"]
    assert first.ping() and second.ping()
    assert first.quit() == 0 and second.quit() == 0


def test_four_processes_at_once_share_one_server(nats_env: NatsEnv) -> None:
    helpers = [nats_env.helper() for _ in range(4)]
    events = [helper.event() for helper in helpers]
    assert len({(e["server_pid"], e["port"]) for e in events}) == 1, events
    assert sorted(e["started"] for e in events) == [False, False, False, True]
    assert nats_env.servers() == [events[0]["server_pid"]]
    for helper in helpers:
        assert helper.quit() == 0


def test_server_outlives_its_starter_and_stops_after_the_last_client(nats_env: NatsEnv) -> None:
    starter = nats_env.helper()
    started = starter.event()
    other = nats_env.helper()
    assert other.event()["server_pid"] == started["server_pid"]
    assert starter.quit() == 0
    time.sleep(GRACE_S * 2.5)  # well past the grace period: the other client still uses it
    assert pid_alive(started["server_pid"])
    assert other.ping()
    assert other.quit() == 0
    took = wait_until(lambda: not pid_alive(started["server_pid"]), STOP_WITHIN_S, "server stopped")
    assert took >= GRACE_S * 0.5  # not at once: after the grace period
    wait_until(lambda: not pid_alive(started["supervisor_pid"]), 5, "supervisor exited")
    assert nats_env.state() is None
    assert not (nats_env.dir / STATE_FILE).exists()


def test_server_stops_after_the_last_client_is_sigkilled(nats_env: NatsEnv) -> None:
    client = nats_env.helper()
    info = client.event()
    client.proc.send_signal(signal.SIGKILL)
    client.proc.wait(10)
    wait_until(lambda: not pid_alive(info["server_pid"]), STOP_WITHIN_S, "server stopped")
    wait_until(lambda: not pid_alive(info["supervisor_pid"]), 5, "supervisor exited")
    assert not (nats_env.dir / STATE_FILE).exists()


def test_stale_state_is_replaced_by_a_new_server(nats_env: NatsEnv) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    nats_env.dir.mkdir(parents=True)
    stale = {
        "version": 1,
        "supervisor_pid": dead.pid,
        "server_pid": dead.pid,
        "port": free_port(),
        "url": "nats://127.0.0.1:1",
        "listen": None,
        "token": None,
        "monitor_url": f"http://127.0.0.1:{free_port()}",
    }
    (nats_env.dir / STATE_FILE).write_text(json.dumps(stale))
    client = nats_env.helper()
    info = client.event()
    assert info["started"] and info["server_pid"] != dead.pid
    assert nats_env.state()["server_pid"] == info["server_pid"]
    assert client.ping()
    assert client.quit() == 0


def test_state_naming_live_unrelated_pids_is_stale_and_they_are_left_alone(
    nats_env: NatsEnv,
) -> None:
    """A pid reused by another process: alive, but no server answers; it is not ours to kill."""
    unrelated = subprocess.Popen(["sleep", "60"])
    nats_env.others.append(unrelated)
    nats_env.dir.mkdir(parents=True)
    stale = {
        "version": 1,
        "supervisor_pid": unrelated.pid,
        "server_pid": unrelated.pid,
        "port": free_port(),
        "url": "nats://127.0.0.1:1",
        "listen": None,
        "token": None,
        "monitor_url": f"http://127.0.0.1:{free_port()}",
    }
    (nats_env.dir / STATE_FILE).write_text(json.dumps(stale))
    client = nats_env.helper()
    info = client.event()
    assert info["started"] and info["server_pid"] != unrelated.pid
    assert unrelated.poll() is None
    assert client.quit() == 0


def test_crashed_server_is_restarted_on_the_same_port(nats_env: NatsEnv) -> None:
    client = nats_env.helper()
    first = client.event()
    os.kill(first["server_pid"], signal.SIGKILL)
    wait_until(
        lambda: (nats_env.state() or {}).get("server_pid") not in (None, first["server_pid"]),
        10,
        "the supervisor restarted the server",
    )
    state = nats_env.state()
    assert state is not None and state["port"] == first["port"]
    assert state["supervisor_pid"] == first["supervisor_pid"]
    assert client.ping()  # reconnected to the restarted server
    assert client.quit() == 0


def test_killed_supervisor_takes_its_server_along_and_the_next_one_comes_back_on_the_same_port(
    nats_env: NatsEnv,
) -> None:
    client = nats_env.helper()
    first = client.event()
    os.kill(first["supervisor_pid"], signal.SIGKILL)
    wait_until(lambda: not pid_alive(first["server_pid"]), 5, "orphan server stopped")
    second = nats_env.helper()
    info = second.event()
    assert info["started"] and info["port"] == first["port"]
    assert info["server_pid"] != first["server_pid"]
    assert client.ping()  # the first client reconnected on its own
    assert second.ping()
    assert client.quit() == 0 and second.quit() == 0


def test_token_auth_on_a_listen_address(nats_env: NatsEnv) -> None:
    port = free_port()

    async def scenario() -> None:
        conn = await connect_nats(listen=f"127.0.0.1:{port}", token="s3cret-token")
        try:
            assert conn.embedded and conn.server is not None and conn.server.started
            assert conn.server.port == port
            assert conn.share_url == f"nats://s3cret-token@127.0.0.1:{port}"
            with_token = await connect_nats(f"nats://127.0.0.1:{port}", token="s3cret-token")
            await with_token.client.flush()
            await with_token.close()
            from_url = await connect_nats(conn.share_url)
            await from_url.close()
            for token in (None, "wrong"):
                with pytest.raises(NatsError, match=r"authorization violation") as refused:
                    await connect_nats(f"nats://127.0.0.1:{port}", token=token)
                assert f"127.0.0.1:{port}" in str(refused.value)
                assert "\n" not in str(refused.value)
            local = await connect_nats()  # a local process needs no token: the state has it
            assert local.server is not None and not local.server.started
            assert local.token == "s3cret-token"
            await local.close()
            with pytest.raises(NatsError, match="different token"):
                await connect_nats(token="another")
        finally:
            await conn.close()

    asyncio.run(scenario())
    state_file = nats_env.dir / STATE_FILE
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert json.loads(state_file.read_text())["token"] == "s3cret-token"


def test_generated_token_when_listening_without_one(nats_env: NatsEnv) -> None:
    port = free_port()

    async def scenario() -> None:
        conn = await connect_nats(listen=f"127.0.0.1:{port}")
        try:
            assert conn.token and len(conn.token) >= 24
            assert conn.share_url == f"nats://{conn.token}@127.0.0.1:{port}"
            other = await connect_nats(conn.share_url)
            await other.close()
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_listen_conflicts_with_a_running_loopback_server(nats_env: NatsEnv) -> None:
    async def scenario() -> None:
        conn = await connect_nats()
        try:
            with pytest.raises(NatsError, match="loopback only") as conflict:
                await connect_nats(listen=f"127.0.0.1:{free_port()}")
            assert "\n" not in str(conflict.value)
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_jetstream_is_on(nats_env: NatsEnv) -> None:
    async def scenario() -> None:
        conn = await connect_nats()
        try:
            kv = await conn.client.jetstream().create_key_value(bucket="dynamo_test")
            await kv.put("instance", b"worker-1")
            assert (await kv.get("instance")).value == b"worker-1"
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert (nats_env.dir / "store" / "jetstream").is_dir()


def _start_external(nats_env: NatsEnv, port: int, store: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [nats_server_path(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    nats_env.others.append(proc)
    return proc


def test_external_url_is_used_as_is_reconnected_to_and_never_stopped(
    nats_env: NatsEnv, tmp_path: Path
) -> None:
    port = free_port()
    external = _start_external(nats_env, port, tmp_path / "external")
    url = f"nats://127.0.0.1:{port}"

    async def scenario() -> None:
        conn = None
        for _ in range(100):  # until the external server listens
            try:
                conn = await connect_nats(url)
                break
            except NatsError:
                await asyncio.sleep(0.1)
        assert conn is not None
        try:
            assert not conn.embedded and conn.server is None and conn.url == url
            kv = await conn.client.jetstream().create_key_value(bucket="external")
            await kv.put("k", b"v")
            # The server restarts under the client: it reconnects by itself, however long
            # the server was away (longer than the bounded attempts of the first connect).
            external.terminate()
            external.wait(10)
            await asyncio.sleep(2.5)
            restarted = _start_external(nats_env, port, tmp_path / "external")
            sub = await conn.client.subscribe("after.restart")
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    await conn.client.publish("after.restart", b"hello")
                    msg = await sub.next_msg(timeout=0.5)
                    break
                except Exception:
                    await asyncio.sleep(0.2)
            else:
                raise AssertionError("the client did not reconnect to the restarted server")
            assert msg.data == b"hello"
            assert conn.client.is_connected
            assert (
                await (await conn.client.jetstream().key_value("external")).get("k")
            ).value == b"v"
        finally:
            await conn.close()
        await asyncio.sleep(GRACE_S * 2)
        assert restarted.poll() is None  # not ours to stop

    asyncio.run(scenario())
    assert not nats_env.dir.exists() or not (nats_env.dir / STATE_FILE).exists()
    assert nats_env.servers() == []


def test_connect_failure_is_one_clear_error(nats_env: NatsEnv) -> None:
    port, other = free_port(), free_port()

    async def scenario() -> None:
        start = time.monotonic()
        with pytest.raises(NatsError) as failed:
            await connect_nats(f"nats://127.0.0.1:{port}, 127.0.0.1:{other}")
        message = str(failed.value)
        assert f"127.0.0.1:{port}" in message and f"127.0.0.1:{other}" in message
        assert message.startswith("cannot connect to NATS at") and "\n" not in message
        assert time.monotonic() - start < 15
        with pytest.raises(NatsError, match="not HOST:PORT"):
            await connect_nats(listen="no-port")

    asyncio.run(scenario())


def test_supervisor_runs_from_a_frozen_binary_layout(
    nats_env: NatsEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PyInstaller binary is its own interpreter: the supervisor is `dynamo-run
    __nats-supervisor ...` and nats-server sits beside it. The venv's console script and
    nats-server make the same layout."""
    script = Path(sys.executable).parent / "dynamo-run"
    if not script.exists():
        pytest.skip("no dynamo-run console script beside the interpreter")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(script))

    async def scenario() -> None:
        conn = await connect_nats()
        try:
            assert conn.server is not None and conn.server.started
            assert b"__nats-supervisor" in _cmdline(conn.server.supervisor_pid)
            await conn.client.flush()
        finally:
            await conn.close()

    asyncio.run(scenario())
