"""``in=grpc`` as a real process, driven by the real Triton client (tritonclient.grpc): health,
metadata, inference on echo (exact text) and on the default model, decoupled streaming,
cancellation freeing the engine, every error status, the API key, TLS, and in=http,grpc."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_helpers import (
    MODEL_NAME,
    GrpcServer,
    InferenceServerException,
    Stream,
    is_final,
    scalar,
    start_grpc_server,
    text_input,
    text_of,
)
from http_helpers import metric
from test_http_server import _self_signed

try:
    import dynamo_run_llamacpp
except ImportError:  # pragma: no cover - the llama.cpp engine is part of the test set-up
    dynamo_run_llamacpp = None

needs_engine = pytest.mark.skipif(dynamo_run_llamacpp is None, reason="no llama.cpp engine")
PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def echo() -> Iterator[GrpcServer]:
    yield from start_grpc_server(engine_args={"delay_ms": 0})


def _code(exc: InferenceServerException) -> str:
    return str(exc.status())


def test_health_and_metadata(echo: GrpcServer) -> None:
    client = echo.client()
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL_NAME)
    assert client.is_model_ready(MODEL_NAME, "1")
    assert not client.is_model_ready("no-such-model")
    assert client.get_server_metadata(as_json=True)["name"] == "dynamo-run"
    meta = client.get_model_metadata(MODEL_NAME, as_json=True)
    assert meta["name"] == MODEL_NAME and meta["versions"] == ["1"]
    inputs = {t["name"]: t["datatype"] for t in meta["inputs"]}
    assert inputs["text_input"] == "BYTES" and inputs["stream"] == "BOOL"
    assert {t["name"] for t in meta["outputs"]} >= {"text_output", "finish_reason"}
    config = client.get_model_config(MODEL_NAME, as_json=True)["config"]
    assert config["name"] == MODEL_NAME and config["backend"] == "dynamo"
    assert config["model_transaction_policy"]["decoupled"] is True
    assert config["parameters"]["engine"]["string_value"] == "echo"


def test_infer_echo_exact_text(echo: GrpcServer) -> None:
    client = echo.client()
    result = client.infer(
        MODEL_NAME,
        [text_input(PROMPT), scalar("exclude_input_in_output", True, "BOOL")],
        request_id="r-1",
    )
    assert text_of(result) == PROMPT
    assert result.get_response().id == "r-1"
    assert result.as_numpy("finish_reason").tolist() == [b"stop"]
    n_in = int(result.as_numpy("num_input_tokens")[0])
    assert n_in > 5 and int(result.as_numpy("num_output_tokens")[0]) == n_in
    # Triton's backends answer prompt + completion unless exclude_input_in_output is set.
    assert text_of(client.infer(MODEL_NAME, [text_input(PROMPT)])) == PROMPT + PROMPT


def test_sampling_from_tensors_parameters_and_json(echo: GrpcServer) -> None:
    client = echo.client()
    exclude = scalar("exclude_input_in_output", True, "BOOL")
    # TRT-LLM's max_tokens tensor (INT32) truncates the echo.
    result = client.infer(
        MODEL_NAME, [text_input(PROMPT), exclude, scalar("max_tokens", 3, "INT32")]
    )
    assert int(result.as_numpy("num_output_tokens")[0]) == 3
    assert result.as_numpy("finish_reason").tolist() == [b"length"]
    assert PROMPT.startswith(text_of(result))
    # vLLM's sampling_parameters JSON, with numbers as strings as its examples send them.
    params = text_input(
        json.dumps({"max_tokens": "2", "temperature": "0.1"}), "sampling_parameters"
    )
    result = client.infer(MODEL_NAME, [text_input(PROMPT), exclude, params])
    assert int(result.as_numpy("num_output_tokens")[0]) == 2
    # Request parameters, with a tensor winning over them.
    result = client.infer(
        MODEL_NAME, [text_input(PROMPT), exclude], parameters={"max_tokens": 4, "top_k": 5}
    )
    assert int(result.as_numpy("num_output_tokens")[0]) == 4
    result = client.infer(
        MODEL_NAME,
        [text_input(PROMPT), exclude, scalar("max_tokens", 1, "INT32")],
        parameters={"max_tokens": 4},
    )
    assert int(result.as_numpy("num_output_tokens")[0]) == 1
    # Stop words (TRT-LLM) cut the text where they start.
    stop = text_input("brown", "stop_words")
    assert text_of(client.infer(MODEL_NAME, [text_input(PROMPT), exclude, stop])) == "The quick "
    # Only the requested outputs come back.
    import tritonclient.grpc as tc

    result = client.infer(
        MODEL_NAME,
        [text_input(PROMPT), exclude],
        outputs=[tc.InferRequestedOutput("finish_reason")],
    )
    assert result.as_numpy("text_output") is None
    assert result.as_numpy("finish_reason").tolist() == [b"stop"]


def test_chat_template_on_request(echo: GrpcServer) -> None:
    """apply_chat_template=true: text_input is a user message (echo returns the template)."""
    result = echo.client().infer(
        MODEL_NAME,
        [text_input("Hi there"), scalar("exclude_input_in_output", True, "BOOL")],
        parameters={"apply_chat_template": True},
    )
    text = text_of(result)
    # Special tokens are not shown: the template's roles and the message remain.
    assert "user\nHi there\nassistant\n" in text and text.startswith("system\n")


def test_stream_infer_one_response_per_chunk(echo: GrpcServer) -> None:
    client = echo.client()
    stream = Stream(client)
    try:
        stream.send([text_input(PROMPT), scalar("stream", True, "BOOL")], request_id="s-1")
        responses = stream.until_final()
        assert len(responses) > 5
        assert all(not is_final(r) for r in responses[:-1])
        assert "".join(text_of(r) for r in responses) == PROMPT
        assert {r.get_response().id for r in responses} == {"s-1"}
        last = responses[-1]
        assert last.as_numpy("finish_reason").tolist() == [b"stop"]
        assert responses[0].as_numpy("finish_reason") is None
        # stream=false on the stream: one whole response (prompt prepended, as Triton's).
        stream.send([text_input("abc")])
        (whole,) = stream.until_final()
        assert text_of(whole) == "abcabc"
        # Several requests on one stream run concurrently; each gets its own final response.
        for i in range(3):
            stream.send(
                [text_input(f"req {i}"), scalar("stream", True, "BOOL")], request_id=f"c{i}"
            )
        texts: dict[str, str] = {}
        finals = 0
        while finals < 3:
            result, error = stream.next()
            assert error is None, error
            rid = result.get_response().id
            texts[rid] = texts.get(rid, "") + text_of(result)
            finals += is_final(result)
        assert texts == {f"c{i}": f"req {i}" for i in range(3)}
    finally:
        client.stop_stream()


def test_errors_are_status_codes(echo: GrpcServer) -> None:
    client = echo.client()
    cases = [
        ([text_input(PROMPT)], "nope", {}, "NOT_FOUND", "nope"),
        ([scalar("max_tokens", 3, "INT32")], MODEL_NAME, {}, "INVALID_ARGUMENT", "text_input"),
        (
            [text_input(PROMPT), scalar("temperature", 9.0, "FP32")],
            MODEL_NAME, {}, "INVALID_ARGUMENT", "temperature",
        ),
        (
            [text_input(PROMPT), text_input("x", "mystery")],
            MODEL_NAME, {}, "INVALID_ARGUMENT", "mystery",
        ),
        (
            [text_input(PROMPT), text_input("{not json", "sampling_parameters")],
            MODEL_NAME, {}, "INVALID_ARGUMENT", "sampling_parameters",
        ),
        ([text_input(PROMPT)], MODEL_NAME, {"top_p": "zero"}, "INVALID_ARGUMENT", "top_p"),
        ([text_input("")], MODEL_NAME, {}, "INVALID_ARGUMENT", "text_input"),
    ]  # fmt: skip
    for inputs, model, params, code, named in cases:
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, inputs, parameters=params or None)
        assert _code(info.value) == f"StatusCode.{code}", info.value
        assert named in info.value.message(), info.value
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL_NAME, [text_input(PROMPT)], model_version="7")
    assert _code(info.value) == "StatusCode.NOT_FOUND"
    for call in (client.get_model_metadata, client.get_model_config):
        with pytest.raises(InferenceServerException) as info:
            call("nope")
        assert _code(info.value) == "StatusCode.NOT_FOUND"
    # In a stream an error is a response of its own, and the stream goes on.
    stream = Stream(client)
    try:
        stream.send([text_input(PROMPT)], model="nope")
        result, error = stream.next()
        assert result is None and "nope" in str(error)
        stream.send([text_input("ok"), scalar("stream", True, "BOOL")])
        assert "".join(text_of(r) for r in stream.until_final()) == "ok"
    finally:
        client.stop_stream()
    assert client.is_server_live()  # nothing crashed


def test_api_key() -> None:
    server = GrpcServer(args=["--api-key", "s3cret"], engine_args={"delay_ms": 0})
    try:
        server.wait_ready()  # health stays open, like HTTP's /health
        client = server.client()
        assert client.is_model_ready(MODEL_NAME)
        exclude = scalar("exclude_input_in_output", True, "BOOL")
        for headers in (None, {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
            with pytest.raises(InferenceServerException) as info:
                client.infer(MODEL_NAME, [text_input("hi"), exclude], headers=headers)
            assert _code(info.value) == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata(MODEL_NAME)
        assert _code(info.value) == "StatusCode.UNAUTHENTICATED"
        for headers in ({"authorization": "Bearer s3cret"}, {"x-api-key": "s3cret"}):
            result = client.infer(MODEL_NAME, [text_input("hi"), exclude], headers=headers)
            assert text_of(result) == "hi"
        stream = Stream(client)  # refused as it opens, before any request
        result, error = stream.next()
        assert result is None and _code(error) == "StatusCode.UNAUTHENTICATED"
        client.stop_stream()
        stream = Stream(client, headers={"authorization": "Bearer s3cret"})
        stream.send([text_input("hi"), exclude])
        assert text_of(stream.until_final()[-1]) == "hi"
        client.stop_stream()
        assert server.stop() == 0
    finally:
        server.cleanup()


def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = GrpcServer(
        args=["--tls-cert-path", str(cert), "--tls-key-path", str(key)],
        engine_args={"delay_ms": 0},
    )
    try:
        server.wait_ready(ssl=True, root_certificates=str(cert))
        client = server.client(ssl=True, root_certificates=str(cert))
        exclude = scalar("exclude_input_in_output", True, "BOOL")
        assert text_of(client.infer(MODEL_NAME, [text_input("secure"), exclude])) == "secure"
        plain = server.client()
        with pytest.raises(InferenceServerException) as info:
            plain.is_server_live(client_timeout=3)
        assert _code(info.value) in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
        assert server.stop() == 0
    finally:
        server.cleanup()


def test_http_and_grpc_share_the_engine_and_metrics_and_cancel_frees_it() -> None:
    """in=http,grpc: both answer; cancelling a gRPC stream frees the engine at once, and
    the requests are counted with their endpoint and gRPC status."""
    import httpx

    server = GrpcServer(http=True, engine_args={"delay_ms": 50})
    try:
        server.wait_ready()
        base = f"http://127.0.0.1:{server.http_port}"
        res = httpx.post(base + "/v1/completions", json={"prompt": "hi there"}, timeout=30)
        assert res.json()["choices"][0]["text"] == "hi there"
        client = server.client()
        exclude = scalar("exclude_input_in_output", True, "BOOL")
        assert text_of(client.infer(MODEL_NAME, [text_input("hi there"), exclude])) == "hi there"
        stream = Stream(client)
        long_prompt = " ".join(f"w{i}" for i in range(200))  # ~10 s at 50 ms a token
        stream.send([text_input(long_prompt), scalar("stream", True, "BOOL")])
        result, error = stream.next()
        assert error is None and not is_final(result)
        assert metric(server.metrics(), "dynamo_engine_inflight_requests") == 1
        client.stop_stream(cancel_requests=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            values = server.metrics()
            if metric(values, "dynamo_engine_inflight_requests") == 0:
                break
            time.sleep(0.05)
        assert metric(values, "dynamo_engine_inflight_requests") == 0
        assert metric(values, "dynamo_frontend_inflight_requests") == 0
        requests = "dynamo_frontend_requests_total"
        assert metric(values, requests, endpoint="model_infer", status="OK") == 1
        assert metric(values, requests, endpoint="model_stream_infer", status="CANCELLED") == 1
        assert metric(values, requests, endpoint="completions", status="200") == 1
        assert metric(values, "dynamo_frontend_time_to_first_token_seconds_count") == 3
        assert server.stop() == 0
    finally:
        server.cleanup()


def test_port_in_use_is_one_line_exit_1(echo: GrpcServer) -> None:
    from conftest import run_cli

    done = run_cli("in=grpc", "out=echo", "--grpc-port", str(echo.port), timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "cannot listen" in done.stderr


@needs_engine
@pytest.mark.model
def test_default_model_infer_and_stream() -> None:
    for server in start_grpc_server(out="llamacpp"):
        client = server.client()
        params = {"temperature": 0.0, "max_tokens": 12}
        inputs = [
            text_input("The capital of France is"),
            scalar("exclude_input_in_output", True, "BOOL"),
        ]
        whole = client.infer(MODEL_NAME, inputs, parameters=params)
        text = text_of(whole)
        assert text.strip() and int(whole.as_numpy("num_output_tokens")[0]) <= 12
        stream = Stream(client)
        stream.send([*inputs, scalar("stream", True, "BOOL")], parameters=params)
        responses = stream.until_final()
        client.stop_stream()
        assert "".join(text_of(r) for r in responses) == text  # greedy: the same answer
        assert len(responses) > 1
        chat = client.infer(MODEL_NAME, inputs, parameters={**params, "apply_chat_template": True})
        assert text_of(chat).strip()


def test_grpc_is_not_imported_by_help() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dynamo_run", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "grpc" not in imported and "tritonclient" not in imported
    assert "in=grpc" in done.stdout


def test_out_dyn_serves_the_workers_models() -> None:
    """in=grpc out=dyn: models come from discovery; ModelReady follows the workers."""
    from dist_helpers import NatsServer, Worker

    nats = NatsServer()
    worker = Worker(
        nats.url, endpoint="dyn://grpcdyn.backend.generate", engine_args={"delay_ms": 0}
    )
    server = GrpcServer(out="dyn://grpcdyn.backend.generate", args=["--nats-url", nats.url])
    try:
        worker.wait_ready()
        server.wait_ready()
        client = server.client()
        deadline = time.monotonic() + 30
        while not client.is_model_ready(MODEL_NAME) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.is_model_ready(MODEL_NAME)
        exclude = scalar("exclude_input_in_output", True, "BOOL")
        assert text_of(client.infer(MODEL_NAME, [text_input("over nats"), exclude])) == "over nats"
        stream = Stream(client)
        stream.send([text_input("streamed"), scalar("stream", True, "BOOL")])
        assert "".join(text_of(r) for r in stream.until_final()) == "streamed"
        client.stop_stream()
        with pytest.raises(InferenceServerException) as info:
            client.infer("other-model", [text_input("x")])
        assert _code(info.value) == "StatusCode.NOT_FOUND"  # never served: as HTTP's 404
        assert worker.stop() == 0
        deadline = time.monotonic() + 10
        while client.is_model_ready(MODEL_NAME) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not client.is_model_ready(MODEL_NAME)
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL_NAME, [text_input("x")])
        assert _code(info.value) == "StatusCode.UNAVAILABLE"  # its workers left: may come back
        assert server.stop() == 0
    finally:
        server.cleanup()
        worker.cleanup()
        nats.cleanup()
