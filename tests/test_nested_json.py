"""Deeply nested JSON from a client is a clear 400 (INVALID_ARGUMENT, an error line), never a
500 with a RecursionError traceback: on every HTTP route, over gRPC, and on batch lines.

100k levels is what broke the JSON decoder (under 1 MB, far below the 32 MiB body limit);
200 levels decode but are past the limit of 128 (dynamo_run.protocol.json_input).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import run_cli
from grpc_helpers import MODEL_NAME, GrpcServer, InferenceServerException, start_grpc_server
from grpc_helpers import text_input as grpc_text
from http_helpers import Server, echo_server_fixture, start_server  # noqa: F401

from dynamo_run.protocol import json_input

DEEP = 100_000
DEPTHS = (DEEP, 200)
TOO_DEEP = "nested deeper than 128 levels"


def nested(levels: int, inner: str = "") -> str:
    return "[" * levels + inner + "]" * levels


def deep_bodies(levels: int) -> dict[str, str]:
    """A body per POST route, each deep where that route's request has a list."""
    return {
        "/chat/completions": '{"model": "' + MODEL_NAME + '", "messages": ' + nested(levels) + "}",
        "/completions": '{"prompt": ' + nested(levels, "1") + ', "max_tokens": 2}',
        "/embeddings": '{"input": ' + nested(levels, '"a"') + "}",
    }


def test_loads_limits_depth_without_recursing() -> None:
    assert json_input.loads(nested(128)) == json.loads(nested(128))
    # Brackets inside strings are text, not nesting.
    assert json_input.loads(json.dumps({"a": "[{" * 500 + '\\"[', "b": [[1]]}))["b"] == [[1]]
    for levels in (129, 1000, DEEP):
        for text in (nested(levels), nested(levels).encode(), nested(levels).encode("utf-16")):
            with pytest.raises(json_input.JsonTooDeep, match=TOO_DEEP):
                json_input.loads(text)
    with pytest.raises(json.JSONDecodeError):
        json_input.loads("[" * 100)  # unbalanced: plain bad JSON
    with pytest.raises(json_input.JsonTooDeep):
        json_input.loads("[" * DEEP)  # bad too, but first of all too deep


def test_http_every_route_answers_400(echo_server: Server) -> None:
    with httpx.Client(base_url=echo_server.url, timeout=30.0) as client:
        for levels in DEPTHS:
            for path, body in deep_bodies(levels).items():
                response = client.post(
                    path, content=body, headers={"content-type": "application/json"}
                )
                assert response.status_code == 400, (path, response.text)
                error = response.json()["error"]
                assert error["type"] == "invalid_request_error"
                assert error["code"] == "json_too_deep"
                assert error["message"] == f"the request body is JSON {TOO_DEEP}", error
        # A tool call's arguments are JSON text: nested too deeply (past the interpreter's
        # recursion limit, within the context) they stay text, as sent.
        call = {"id": "c1", "type": "function"}
        call["function"] = {"name": "f", "arguments": nested(3000)}
        messages = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ]
        response = client.post("/chat/completions", json={"messages": messages, "max_tokens": 2})
        assert response.status_code == 200, response.text
        # The server still answers.
        response = client.post("/completions", json={"prompt": "still here", "max_tokens": 2})
        assert response.status_code == 200, response.text
    assert "Traceback" not in echo_server.log()
    assert "RecursionError" not in echo_server.log()


def test_http_deep_json_in_an_answer_stays_text() -> None:
    """Echo answers with the prompt, so a client can make the answer hold a tool call whose
    JSON nests past the interpreter's recursion limit: the parser leaves it as content."""
    call = '<tool_call>{"name": "f", "arguments": ' + nested(3000) + "}</tool_call>"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": call}], "tools": tools, "max_tokens": 8000}
    servers = start_server(args=["--tool-call-parser", "hermes"], engine_args={"delay_ms": 0})
    server = next(servers)
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        whole = client.post("/chat/completions", json=body)
        assert whole.status_code == 200, whole.text
        message = whole.json()["choices"][0]["message"]
        assert nested(3000) in message["content"] and not message.get("tool_calls")
        streamed = client.post("/chat/completions", json={**body, "stream": True})
        assert streamed.status_code == 200
        assert '"error"' not in streamed.text and streamed.text.endswith("data: [DONE]\n\n")
    assert "Traceback" not in server.log()
    next(servers, None)  # stop it (and check it exits 0)


@pytest.fixture(scope="module")
def grpc_echo() -> Iterator[GrpcServer]:
    yield from start_grpc_server(engine_args={"delay_ms": 0})


def test_grpc_sampling_parameters_invalid_argument(grpc_echo: GrpcServer) -> None:
    client = grpc_echo.client()
    try:
        for levels in DEPTHS:
            inputs = [grpc_text("Hi"), grpc_text(nested(levels), "sampling_parameters")]
            with pytest.raises(InferenceServerException) as info:
                client.infer(MODEL_NAME, inputs)
            assert str(info.value.status()) == "StatusCode.INVALID_ARGUMENT", info.value
            assert info.value.message() == f"input 'sampling_parameters': JSON {TOO_DEEP}"
            # Deep inside a key's value, too.
            deep_stop = '{"stop": ' + nested(levels, '"x"') + "}"
            inputs = [grpc_text("Hi"), grpc_text(deep_stop, "sampling_parameters")]
            with pytest.raises(InferenceServerException) as info:
                client.infer(MODEL_NAME, inputs)
            assert TOO_DEEP in info.value.message()
        assert client.is_server_live()
    finally:
        client.close()
    assert "Traceback" not in grpc_echo.log()


@pytest.mark.parametrize("form", ["text", "openai"])
def test_batch_bad_line_reported_rest_runs(tmp_path: Path, form: str) -> None:
    if form == "text":
        good = [json.dumps({"text": "first"}), json.dumps({"text": "last"})]
        deep = ['{"messages": ' + nested(levels) + "}" for levels in DEPTHS]
    else:
        body = {"messages": [{"role": "user", "content": "x"}]}
        good = [
            json.dumps({"custom_id": i, "method": "POST", "url": "/v1/chat/completions",
                        "body": body})
            for i in ("first", "last")
        ]  # fmt: skip
        deep = [
            f'{{"custom_id": "deep{levels}", "method": "POST", "url": "/v1/chat/completions", '
            f'"body": {{"messages": {nested(levels)}}}}}'
            for levels in DEPTHS
        ]
    # The first line decides the form of bad lines: a text file's starts with a deep one.
    rows = [deep[0], good[0], deep[1], good[1]] if form == "text" else [good[0], *deep, good[1]]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(rows) + "\n")
    extra = tmp_path / "echo.json"
    extra.write_text('{"delay_ms": 0}')
    result = run_cli(f"in=batch:{inp}", "out=echo", "--extra-engine-args", str(extra))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    out = [json.loads(line) for line in (tmp_path / "output.jsonl").read_text().splitlines()]
    assert len(out) == 4
    errors = [r["error"] for r in out]
    bad = (0, 2) if form == "text" else (1, 2)
    assert [i for i, e in enumerate(errors) if e is not None] == list(bad)
    for error in (errors[i] for i in bad):
        message = error if form == "text" else error["message"]
        assert message == f"invalid JSON: JSON {TOO_DEEP}", error
    assert "batch: 4 of 4 lines: 2 ok, 2 failed" in result.stderr
