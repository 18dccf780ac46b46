"""Tool calls and JSON schemas with the real default model (SmolLM2-135M), driven by the
official ``openai`` client: forced calls and schemas through llama.cpp grammars on the
model's own template, and auto-parsed Hermes calls with ``--chat-template``."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from http_helpers import MODEL_NAME, ROOT, Server, start_server

pytestmark = pytest.mark.model

try:
    from dynamo_run_llamacpp.engine import LlamaCppEngine
except ImportError:  # pragma: no cover - the engine is an optional distribution
    LlamaCppEngine = None  # type: ignore[assignment,misc]

HERMES_TEMPLATE = ROOT / "tests" / "templates" / "hermes_tools.jinja"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": WEATHER,
        },
    },
    {"type": "function", "function": {"name": "add", "description": "Add", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What's the weather like in Paris today?"}]


def _server(args: list[str]) -> Iterator[Server]:
    if LlamaCppEngine is None:
        pytest.skip("dynamo-run-llamacpp not installed")
    yield from start_server(out="llamacpp", args=args)


@pytest.fixture(scope="module")
def own_template() -> Iterator[openai.OpenAI]:
    """The default model with its own chat template (no tool support in it)."""
    for server in _server([]):
        yield openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def hermes() -> Iterator[openai.OpenAI]:
    """The default model with a Hermes tool-call template (the parser is detected from it)."""
    for server in _server(["--chat-template", str(HERMES_TEMPLATE)]):
        yield openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=180)


def _check_call(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def test_named_tool_call_is_forced_on_the_models_own_template(own_template) -> None:
    res = own_template.chat.completions.create(
        model=MODEL_NAME,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
    )
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    _check_call("get_weather", call.function.arguments)


def test_required_tool_call_streams_deltas_that_join_to_the_call(own_template) -> None:
    kwargs = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
        "tools": TOOLS,
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 80,
    }
    whole = own_template.chat.completions.create(**kwargs)
    (expected,) = whole.choices[0].message.tool_calls or []
    stream = own_template.chat.completions.create(**kwargs, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        choice = chunk.choices[0]
        assert not choice.delta.content
        for piece in choice.delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
            if piece.id:
                assert call["id"] is None, "the id comes once"
                call["id"] = piece.id
            if piece.function and piece.function.name:
                call["name"] += piece.function.name
            if piece.function and piece.function.arguments:
                call["arguments"] += piece.function.arguments
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    assert calls[0]["name"] == expected.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(expected.function.arguments)
    _check_call(calls[0]["name"], calls[0]["arguments"])


def test_json_schema_response_validates(own_template) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer"},
            "colours": {
                "type": "array",
                "items": {"type": "string", "maxLength": 20},
                "maxItems": 3,
            },
        },
        "required": ["name", "age", "colours"],
        "additionalProperties": False,
    }
    res = own_template.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
        max_tokens=120,
    )
    choice = res.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_strict_schema_with_unenforceable_keywords_is_refused(own_template) -> None:
    body = {
        "messages": ASK,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "n",
                "strict": True,
                "schema": {
                    "type": "object",
                    "properties": {"n": {"type": "integer", "minimum": 3}},
                },
            },
        },
    }
    res = httpx.post(str(own_template.base_url) + "chat/completions", json=body, timeout=30)
    assert res.status_code == 400
    error = res.json()["error"]
    assert error["param"] == "response_format" and "'minimum'" in error["message"]
    body["response_format"]["json_schema"]["strict"] = False  # best effort: accepted
    body["max_tokens"] = 30
    res = httpx.post(str(own_template.base_url) + "chat/completions", json=body, timeout=120)
    assert res.status_code == 200


def test_schema_the_converter_rejects_is_a_400(own_template) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        own_template.chat.completions.create(
            model=MODEL_NAME,
            messages=ASK,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "abc"}},
            },
        )
    assert "cannot be enforced" in str(info.value)


def test_default_model_takes_tools_without_flags(own_template) -> None:
    """The built-in model's card adds a Hermes tool branch to its template (detected as
    hermes), so `tools` work with no flags; a call it makes names a tool and fits its schema."""
    for messages in (ASK, _few_shot("What's the weather in Paris?")):
        res = own_template.chat.completions.create(
            model=MODEL_NAME, messages=messages, tools=TOOLS, temperature=0, max_tokens=60
        )
        choice = res.choices[0]
        for call in choice.message.tool_calls or []:
            _check_call(call.function.name, call.function.arguments)
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
        else:  # plain text, possibly run to max_tokens (a malformed call stays text too)
            assert choice.finish_reason in ("stop", "length") and choice.message.content
    # With two earlier calls as examples, the 135M model calls the tool itself.
    assert choice.finish_reason == "tool_calls", choice
    assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] == "Paris"


def _few_shot(question: str) -> list[dict]:
    """Two earlier turns that called the tool: enough for the 135M model to call it too."""

    def call(i: int, city: str) -> dict:
        arguments = json.dumps({"city": city, "unit": "celsius"})
        fn = {"name": "get_weather", "arguments": arguments}
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": f"call_{i}", "type": "function", "function": fn}],
        }

    return [
        {"role": "user", "content": "What's the weather in London?"},
        call(0, "London"),
        {"role": "user", "content": "And in Rome?"},
        call(1, "Rome"),
        {"role": "user", "content": question},
    ]


def test_auto_tool_call_parsed_from_the_models_text(hermes) -> None:
    kwargs = {
        "model": MODEL_NAME,
        "messages": _few_shot("What's the weather in Paris?"),
        "tools": TOOLS,
        "temperature": 0,
        "max_tokens": 60,
    }
    res = hermes.chat.completions.create(**kwargs)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert _check_call("get_weather", call.function.arguments)["city"] == "Paris"
    # Streamed: the same call, and no <tool_call> markup leaks into the content.
    stream = hermes.chat.completions.create(**kwargs, stream=True)
    content, name, arguments, finish = "", "", "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            name += (piece.function and piece.function.name) or ""
            arguments += (piece.function and piece.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert "<tool_call>" not in content and not content.strip()
    assert (name, json.loads(arguments), finish) == (
        "get_weather",
        json.loads(call.function.arguments),
        "tool_calls",
    )


def test_tool_choice_none_is_never_parsed(hermes) -> None:
    res = hermes.chat.completions.create(
        model=MODEL_NAME,
        messages=_few_shot("What's the weather in Paris?"),
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=60,
    )
    choice = res.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert "<tool_call>" in (choice.message.content or "")


def test_tool_result_round_trip(hermes) -> None:
    """The call goes back as an assistant message with tool_calls, the result as a tool
    message; the model answers in text."""
    messages = _few_shot("What's the weather in Paris?")
    first = hermes.chat.completions.create(
        model=MODEL_NAME, messages=messages, tools=TOOLS, temperature=0, max_tokens=60
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    second = hermes.chat.completions.create(
        model=MODEL_NAME, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=40
    )
    assert second.choices[0].message.content
    assert second.usage is not None and first.usage is not None
    # The whole exchange, result included, reached the template: a longer prompt.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10
