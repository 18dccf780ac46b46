"""Two hosts simulated with network namespaces joined by a veth pair (needs root).

Host A runs the frontend (``in=http out=dyn``), whose embedded NATS server listens on A's
link address with a token; host B runs a worker that joins with the ``--nats-url`` the
frontend printed. A client on A is served by the worker on B; a worker on B with a wrong or
no token is refused in one line; a SIGKILLed worker leaves /v1/models within its lease.

Traffic goes only between the two namespaces (and their own loopbacks).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from dist_helpers import DynProcess, NetnsHosts, NetnsUnavailable, Worker, netns_exec, start_procs
from http_helpers import MODEL_NAME

CLIENT = Path(__file__).resolve().parent / "two_hosts_client.py"
ENDPOINT = "dyn://two.backend.generate"
NATS_PORT = 4222  # fresh namespaces: every port is free
HTTP_PORT = 8000
TOKEN = "two-hosts-token"
LEASE_S = 2


@pytest.fixture(scope="module")
def hosts():
    try:
        pair = NetnsHosts(str(os.getpid()))
    except NetnsUnavailable as exc:
        pytest.skip(f"two simulated hosts unavailable: {exc}")
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture(scope="module")
def state_dirs():
    """A NATS state directory per host (the embedded server is shared per host)."""
    with tempfile.TemporaryDirectory(prefix="dyn2hosts-") as tmp:
        yield {"a": str(Path(tmp) / "a"), "b": str(Path(tmp) / "b")}


@pytest.fixture(scope="module")
def frontend_a(hosts, state_dirs):
    """The frontend on host A; it starts the embedded NATS server, reachable from B."""
    fe = DynProcess(
        ["in=http", "out=dyn", "--http-host", "127.0.0.1", "--http-port", str(HTTP_PORT),
         "--nats-listen", f"{hosts.addr_a}:{NATS_PORT}", "--nats-token", TOKEN],
        netns=hosts.a,
        env={"DYN_NATS_DIR": state_dirs["a"], "DYN_NATS_GRACE_S": "1"},
    )  # fmt: skip
    try:
        fe.wait_for(r"serving the models of the workers", timeout=60)
        yield fe
        assert fe.stop() == 0, fe.log()
    finally:
        fe.cleanup()


@pytest.fixture()
def procs():
    yield from start_procs()


def share_url(fe: DynProcess) -> str:
    return fe.wait_for(r"other hosts join with --nats-url (\S+)", timeout=30)[1]


def worker_b(hosts, state_dirs, procs, nats_url: str) -> Worker:
    worker = Worker(
        nats_url, endpoint=ENDPOINT, netns=hosts.b,
        env={"DYN_NATS_DIR": state_dirs["b"], "DYN_LEASE_S": str(LEASE_S)},
    )  # fmt: skip
    procs.append(worker)
    return worker


def client_on_a(hosts, *args: str) -> subprocess.Popen:
    argv = [*netns_exec(hosts.a), sys.executable, str(CLIENT), *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(client: subprocess.Popen, timeout: float = 60) -> dict:
    try:
        out, err = client.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        client.kill()
        out, err = client.communicate()
    assert client.returncode == 0, f"client exited {client.returncode}:\n{out}\n{err}"
    return json.loads(out.strip().splitlines()[-1])


def test_frontend_prints_the_url_for_other_hosts(hosts, frontend_a):
    assert share_url(frontend_a) == f"nats://{TOKEN}@{hosts.addr_a}:{NATS_PORT}"


def test_request_served_across_hosts_and_killed_worker_leaves(hosts, state_dirs, frontend_a, procs):
    worker = worker_b(hosts, state_dirs, procs, share_url(frontend_a)).wait_ready()
    assert f"NATS nats://***@{hosts.addr_a}:{NATS_PORT}" in worker.log()
    assert TOKEN not in worker.log()  # the token is never logged

    url = f"http://127.0.0.1:{HTTP_PORT}/v1"
    answer = finish(client_on_a(hosts, "ask", url, MODEL_NAME, "hello across the veth"))
    assert answer["models"] == [MODEL_NAME]
    assert "hello across the veth" in answer["reply"]  # the echo engine, on host B
    assert answer["requests"] == {worker.instance_id: 1}

    watcher = client_on_a(hosts, "watch", url, MODEL_NAME, "20")
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "listed"
        killed_at = time.time()
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)
    except BaseException:
        watcher.kill()
        watcher.communicate()
        raise
    gone = finish(watcher)
    assert gone["gone_at"] is not None, f"still listed 20 s after SIGKILL: {gone['models']}"
    assert gone["models"] == []
    assert gone["gone_at"] - killed_at < LEASE_S + 3, gone["gone_at"] - killed_at


@pytest.mark.parametrize("token", ["wrong-token", None], ids=["wrong-token", "no-token"])
def test_worker_without_the_token_is_refused(hosts, state_dirs, frontend_a, procs, token):
    auth = f"{token}@" if token else ""
    worker = worker_b(hosts, state_dirs, procs, f"nats://{auth}{hosts.addr_a}:{NATS_PORT}")
    assert worker.proc.wait(60) == 1, worker.log()
    lines = worker.log().strip().splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(
        rf"dynamo-run: error: in=dyn: NATS at nats://(\*\*\*@)?{re.escape(hosts.addr_a)}:"
        rf"{NATS_PORT} refused the connection: authorization violation .*--nats-token.*",
        lines[0],
    ), lines[0]
    assert "Traceback" not in worker.log()
    if token:
        assert token not in worker.log()
