"""The server process: API key, TLS, request templates, client hang-ups, signals, start-up
failures. Each test starts its own ``dynamo-run in=http out=echo`` on a free port."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from http_helpers import (  # noqa: F401
    MODEL_NAME,
    PYTHON,
    ROOT,
    Server,
    free_port,
    metric,
    slow_echo_server_fixture,
    start_server,
)

LONG = "word " * 200  # about 200 tokens: 10 s at 50 ms per token


def _inflight(server: Server) -> tuple[float, float]:
    values = server.metrics()
    return (
        metric(values, "dynamo_frontend_inflight_requests"),
        metric(values, "dynamo_engine_inflight_requests"),
    )


def _wait_idle(server: Server, within: float) -> float:
    """Seconds until nothing is in flight (front end and engine); fails after ``within``."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if _inflight(server) == (0.0, 0.0):
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"still in flight after {within}s: {_inflight(server)}")


def test_stream_hang_up_cancels_generation(slow_echo_server: Server) -> None:
    body = {"messages": [{"role": "user", "content": LONG}], "stream": True}
    with httpx.stream("POST", slow_echo_server.url + "/chat/completions", json=body) as res:
        lines = res.iter_lines()
        received = [next(lines) for _ in range(6)]  # role chunk and a few tokens
        assert all(line.startswith("data: ") or not line for line in received)
        assert _inflight(slow_echo_server) == (1.0, 1.0)
    _wait_idle(slow_echo_server, within=1.0)
    values = slow_echo_server.metrics()
    assert metric(values, "dynamo_frontend_requests_total", status="499") >= 1


def test_unary_hang_up_cancels_generation(slow_echo_server: Server) -> None:
    body = {"prompt": LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_echo_server.url + "/completions", json=body, timeout=0.5)
    _wait_idle(slow_echo_server, within=1.0)


def test_requests_run_concurrently(slow_echo_server: Server) -> None:
    """Eight 20-token answers at 50 ms per token take about 1 s together, not 8 s."""
    client = openai.OpenAI(base_url=slow_echo_server.url, api_key="x", max_retries=0)
    results: list[str] = []

    def one() -> None:
        res = client.completions.create(model=MODEL_NAME, prompt="a " * 20)
        results.append(res.choices[0].text)

    threads = [threading.Thread(target=one) for _ in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    assert results == ["a " * 20] * 8
    assert elapsed < 4.0, elapsed  # one after another would take 8 s


def test_api_key(tmp_path: Path) -> None:
    for server_args, env in ((["--api-key", "s3cret"], {}), ([], {"DYN_API_KEY": "s3cret"})):
        for server in start_server(engine_args={"delay_ms": 0}, args=server_args, env=env):
            url = server.url
            good = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
            assert good.models.list().data[0].id == MODEL_NAME
            res = good.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=1)
            assert res.choices[0].text == "hi"
            bad = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
            with pytest.raises(openai.AuthenticationError) as err:
                bad.models.list()
            assert err.value.code == "invalid_api_key"
            res = httpx.post(url + "/chat/completions", json={"messages": []})
            assert res.status_code == 401
            assert res.json()["error"]["code"] == "missing_api_key"
            assert res.headers["www-authenticate"] == "Bearer"
            for path in ("/health", "/live", "/metrics"):
                assert httpx.get(server.root + path).status_code == 200
            # Browsers: the CORS preflight has no key; the request itself does.
            preflight = httpx.options(
                url + "/completions",
                headers={
                    "origin": "http://ui.example",
                    "access-control-request-method": "POST",
                    "access-control-request-headers": "authorization,content-type",
                },
            )
            assert preflight.status_code == 200
            assert preflight.headers["access-control-allow-origin"] == "*"
            res = httpx.post(
                url + "/completions",
                json={"prompt": "hi", "max_tokens": 1},
                headers={"origin": "http://ui.example", "authorization": "Bearer s3cret"},
            )
            assert res.status_code == 200 and res.json()["choices"][0]["text"] == "hi"
            assert res.headers["access-control-allow-origin"] == "*"


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    args = ["--tls-cert-path", str(cert), "--tls-key-path", str(key)]
    server = Server(engine_args={"delay_ms": 0}, args=args, scheme="https")
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        server.wait_ready(verify=trust)
        client = openai.OpenAI(
            base_url=server.url,
            api_key="x",
            max_retries=0,
            http_client=httpx.Client(verify=trust),
        )
        res = client.completions.create(model=MODEL_NAME, prompt="secure hello")
        assert res.choices[0].text == "secure hello"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=2)
        assert f"serving {MODEL_NAME} at https://127.0.0.1:{server.port}/v1" in server.log()
        assert server.stop() == 0
    finally:
        server.cleanup()


def test_request_template_defaults(tmp_path: Path) -> None:
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"model": MODEL_NAME, "max_tokens": 2, "temperature": 0.5}))
    for server in start_server(
        engine_args={"delay_ms": 0}, args=["--request-template", str(template)]
    ):
        res = httpx.post(server.url + "/completions", json={"prompt": "one two three"}).json()
        assert res["choices"][0]["text"] == "one two"
        assert res["choices"][0]["finish_reason"] == "length"
        res = httpx.post(
            server.url + "/completions", json={"prompt": "one two three", "max_tokens": 3}
        ).json()
        assert res["choices"][0]["text"] == "one two three"


def test_sigterm_lets_in_flight_stream_finish(tmp_path: Path) -> None:
    server = Server(engine_args={"delay_ms": 50})
    try:
        server.wait_ready()
        body = {"prompt": "a b c d e f g h i j", "stream": True}
        with httpx.stream("POST", server.url + "/completions", json=body) as res:
            lines = res.iter_lines()
            next(lines)
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert server.proc.wait(15) == 0
        assert "Traceback" not in server.log()
    finally:
        server.cleanup()


def test_sigint_exits_zero() -> None:
    server = Server(engine_args={"delay_ms": 0})
    try:
        server.wait_ready()
        assert server.stop(signal.SIGINT) == 0
    finally:
        server.cleanup()


def test_failed_load_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    missing = tmp_path / "missing.gguf"
    proc = subprocess.run(
        [PYTHON, "-m", "dynamo_run", "in=http", "out=echo", str(missing), "--http-port", str(port)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and str(missing) in errors[0], proc.stderr


def test_port_in_use_exits_nonzero(slow_echo_server: Server) -> None:
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "dynamo_run",
            "in=http",
            "out=echo",
            "--http-port",
            str(slow_echo_server.port),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{slow_echo_server.port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def _lines_until_content(res: httpx.Response) -> list[str]:
    """The stream's lines up to and including its first event with generated text."""
    seen = []
    for line in res.iter_lines():
        seen.append(line)
        if line.startswith("data: {"):
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("text") or choice.get("delta", {}).get("content"):
                return seen
    raise AssertionError(f"no content in {seen}")


def test_sse_keepalive_comments_while_the_first_token_is_slow() -> None:
    """A first token slower than the keep-alive interval (a long prefill): `: ping` comments
    come meanwhile on every streamed route, and the openai client still parses the stream."""
    env = {"DYN_HTTP_SSE_KEEPALIVE_S": "0.2"}
    for server in start_server(engine_args={"delay_ms": 900}, env=env):
        for path, body in (
            ("/completions", {"prompt": "Hello there", "max_tokens": 2}),
            ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        ):  # fmt: skip
            body = {"model": MODEL_NAME, "stream": True, **body}
            with httpx.stream("POST", server.url + path, json=body, timeout=30) as res:
                lines = _lines_until_content(res)
            assert lines.count(": ping") >= 2, (path, lines)
            assert all(line.startswith(("data: ", ": ping")) or not line for line in lines)
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
            stream=True,
        )  # fmt: skip
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "length"


def test_sse_keepalive_setting_is_checked() -> None:
    server = Server(env={"DYN_HTTP_SSE_KEEPALIVE_S": "soon"})
    try:
        assert server.proc.wait(60) == 2  # a setting's bad value: a usage error
        assert "DYN_HTTP_SSE_KEEPALIVE_S" in server.log() and "soon" in server.log()
        assert "Traceback" not in server.log()
    finally:
        server.cleanup()
