"""Tools and JSON schemas across the NATS hop: the worker's engine says what guided decoding
it enforces (instance record) and its --chat-template / parser flags travel in its model
card, so a plain ``in=http out=dyn`` frontend serves them like a local engine."""

from __future__ import annotations

import json

import openai
import pytest
from dist_helpers import Worker, frontend, start_nats, start_procs, wait_models
from http_helpers import MODEL_NAME, ROOT

pytestmark = pytest.mark.model
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def nats():
    yield from start_nats()


@pytest.fixture()
def procs():
    yield from start_procs()


def _serve(procs, nats_url: str, endpoint: str, out: str, args: list[str]) -> openai.OpenAI:
    worker = Worker(nats_url, out=out, endpoint=endpoint, engine_args={}, args=args)
    procs.append(worker)
    worker.wait_ready()
    fe = frontend(nats_url, out=endpoint)
    procs.append(fe)
    fe.wait_ready()
    wait_models(fe, [MODEL_NAME])
    return openai.OpenAI(base_url=fe.url, api_key="x", max_retries=0, timeout=120)


def test_forced_call_and_worker_flags_over_dyn(nats, procs) -> None:
    pytest.importorskip("dynamo_run_llamacpp")
    template = str(ROOT / "tests" / "templates" / "last_message.jinja")
    client = _serve(
        procs, nats.url, "dyn://tools.backend.generate", "llamacpp",
        ["--chat-template", template, "--tool-call-parser", "hermes"],
    )  # fmt: skip
    res = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Add 2 and 3."}],
        tools=TOOLS,
        tool_choice="required",
        max_tokens=100,
    )
    (call,) = res.choices[0].message.tool_calls or []
    assert res.choices[0].finish_reason == "tool_calls"
    assert set(json.loads(call.function.arguments)) == {"a", "b"}
    # The worker's --tool-call-parser reached the frontend with its card.
    res = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "x"}],
        tools=TOOLS,
        max_tokens=1,
    )
    assert res.choices[0].finish_reason in ("length", "stop")


def test_echo_worker_refuses_json_schema_over_dyn(nats, procs) -> None:
    client = _serve(procs, nats.url, "dyn://toolsecho.backend.generate", "echo", [])
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="json_schema is not supported"):
        client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], response_format=fmt
        )
