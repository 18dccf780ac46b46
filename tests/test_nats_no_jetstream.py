"""``--nats-url`` at a nats-server started without JetStream (no ``-js``): a worker, a
frontend and ``dynamo-run ps`` each exit 1 with one line saying so and how to enable it,
instead of nats-py's bare ``ServiceUnavailableError`` as an internal error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from dist_helpers import NatsServer
from http_helpers import free_port

MESSAGE = (
    "runs without JetStream, which dynamo-run needs for discovery: start nats-server with -js "
    "(or put `jetstream {}` in its config)"
)


@pytest.fixture(scope="module")
def no_js() -> Iterator[NatsServer]:
    server = NatsServer(jetstream=False)
    try:
        yield server
    finally:
        server.cleanup()


def _one_line_exit_1(result, url: str) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"NATS at {url} {MESSAGE}" in lines[0], lines[0]
    return lines[0]


def test_worker(no_js: NatsServer, tmp_path: Path) -> None:
    extra = tmp_path / "echo.json"
    extra.write_text(json.dumps({"delay_ms": 0}))
    result = run_cli(
        "in=dyn://test.worker.generate", "out=echo", "--extra-engine-args", str(extra),
        "--nats-url", no_js.url, timeout=60,
    )  # fmt: skip
    assert _one_line_exit_1(result, no_js.url).startswith("dynamo-run: ")


def test_frontend(no_js: NatsServer) -> None:
    result = run_cli(
        "in=http", "out=dyn", "--http-port", str(free_port()), "--nats-url", no_js.url, timeout=60
    )
    _one_line_exit_1(result, no_js.url)


def test_ps(no_js: NatsServer) -> None:
    result = run_cli("ps", "--nats-url", no_js.url, timeout=60)
    _one_line_exit_1(result, no_js.url)
    assert result.stdout == ""
