"""Reasoning and auto tool-call parsing end to end over HTTP with the ``openai`` client, on
the echo engine: a template that renders only the last message makes the answer exactly
the text sent, so each test chooses what the "model" says."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from http_helpers import MODEL_NAME, ROOT, start_server

LAST_MESSAGE = ROOT / "tests" / "templates" / "last_message.jinja"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            },
        },
    }
]
CALL = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    args = ["--chat-template", str(LAST_MESSAGE), "--tool-call-parser", "hermes"]
    args += ["--reasoning-parser", "qwen3"]
    for server in start_server(engine_args={"delay_ms": 0}, args=args):
        yield openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60)


def _say(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _streamed(client: openai.OpenAI, **kwargs) -> tuple[str, str, dict[int, dict], str | None]:
    """(reasoning, content, calls by index, finish_reason) of a streamed answer."""
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(model=MODEL_NAME, stream=True, **kwargs):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or piece.id
            if piece.function:
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return reasoning, content, calls, finish


def test_reasoning_split_whole_and_streamed(client: openai.OpenAI) -> None:
    text = "<think>The user greets me. I greet back.</think>Hello there!"
    res = client.chat.completions.create(model=MODEL_NAME, messages=_say(text))
    message = res.choices[0].message
    assert message.reasoning_content == "The user greets me. I greet back."  # type: ignore[attr-defined]
    assert message.content == "Hello there!"
    reasoning, content, calls, finish = _streamed(client, messages=_say(text))
    assert (reasoning, content, calls, finish) == (
        "The user greets me. I greet back.",
        "Hello there!",
        {},
        "stop",
    )


def test_no_think_block_is_all_content(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(model=MODEL_NAME, messages=_say("Just an answer."))
    message = res.choices[0].message
    assert message.content == "Just an answer."
    assert getattr(message, "reasoning_content", None) is None


def test_auto_tool_call_whole_and_streamed(client: openai.OpenAI) -> None:
    text = f"<think>I need the sum.</think>{CALL}"
    res = client.chat.completions.create(model=MODEL_NAME, messages=_say(text), tools=TOOLS)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.reasoning_content == "I need the sum."  # type: ignore[attr-defined]
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 1, "b": 2}
    reasoning, content, calls, finish = _streamed(client, messages=_say(text), tools=TOOLS)
    assert reasoning == "I need the sum." and not content.strip() and finish == "tool_calls"
    assert calls[0]["name"] == "add" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"a": 1, "b": 2}


def test_call_inside_reasoning_is_not_a_call(client: openai.OpenAI) -> None:
    text = f"<think>Maybe {CALL}? No.</think>The sum is 3."
    res = client.chat.completions.create(model=MODEL_NAME, messages=_say(text), tools=TOOLS)
    choice = res.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert choice.message.content == "The sum is 3."


def test_json_in_prose_stays_text(client: openai.OpenAI) -> None:
    text = 'Calls look like {"name": "add", "arguments": {"a": 1}} in this format.'
    res = client.chat.completions.create(model=MODEL_NAME, messages=_say(text), tools=TOOLS)
    choice = res.choices[0]
    assert choice.message.tool_calls is None and choice.message.content == text


def test_tool_choice_none_leaves_calls_as_text(client: openai.OpenAI) -> None:
    res = client.chat.completions.create(
        model=MODEL_NAME, messages=_say(CALL), tools=TOOLS, tool_choice="none"
    )
    assert res.choices[0].message.content == CALL and res.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    "extra",
    [
        {"tool_choice": "required", "tools": TOOLS},
        {"tool_choice": {"type": "function", "function": {"name": "add"}}, "tools": TOOLS},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
    ],
)
def test_guided_decoding_on_echo_is_a_clear_400(client: openai.OpenAI, extra: dict) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=_say("x"), **extra)
    body = info.value.body
    assert isinstance(body, dict) and "out=echo" in body["message"]
    assert body["type"] == "invalid_request_error"


def test_bad_tool_requests(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=_say("x"),
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "mul"}},
        )
    with pytest.raises(openai.BadRequestError, match="needs tools"):
        client.chat.completions.create(model=MODEL_NAME, messages=_say("x"), tool_choice="required")
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\]"):
        client.chat.completions.create(
            model=MODEL_NAME, messages=_say("x"), tools=[{"type": "function", "function": {}}]
        )


def test_streamed_chunks_match_the_chunk_model(client: openai.OpenAI) -> None:
    """Raw SSE events of a parsed answer validate against a strict ChatCompletionChunk; the call's
    head (id, type, name, empty arguments) comes before its arguments."""
    import httpx
    from strict_models import validate_json

    from dynamo_run.protocol.openai import ChatCompletionChunk

    body = {"messages": _say(f"<think>r</think>{CALL}"), "tools": TOOLS, "stream": True, "n": 2}
    res = httpx.post(str(client.base_url) + "chat/completions", json=body, timeout=30)
    events = [e.removeprefix("data: ") for e in res.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [validate_json(ChatCompletionChunk, e) for e in events[:-1]]
    for index in (0, 1):
        pieces = [
            call
            for c in chunks
            for choice in c.choices
            if choice.index == index
            for call in choice.delta.tool_calls or []
        ]
        head, *rest = pieces
        assert head.id and head.type == "function" and head.function.name == "add"
        assert head.function.arguments == "" and rest and rest[0].id is None
        finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.index == index]
        assert finishes[-1] == "tool_calls" and finishes.count("tool_calls") == 1


def test_auto_tools_without_a_parser_are_refused() -> None:
    """A template with no tool format and no --tool-call-parser: a 400 that says what to
    pass, not an answer that silently ignores the tools."""
    args = ["--chat-template", str(LAST_MESSAGE)]
    for server in start_server(engine_args={"delay_ms": 0}, args=args):
        plain = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as info:
            plain.chat.completions.create(model=MODEL_NAME, messages=_say("hi"), tools=TOOLS)
        assert "--tool-call-parser" in str(info.value)
        # Without tools the same server answers as usual.
        answer = plain.chat.completions.create(model=MODEL_NAME, messages=_say("hi"))
        assert answer.choices[0].message.content == "hi"


def test_default_model_template_renders_tools_without_flags() -> None:
    """No --chat-template, no parser flag: the built-in model's template lists the tools in
    its system turn (echo answers with the rendered prompt), and renders as before without."""
    for server in start_server(engine_args={"delay_ms": 0}):
        plain = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60)
        with_tools = plain.chat.completions.create(
            model=MODEL_NAME, messages=_say("hi"), tools=TOOLS
        )
        text = with_tools.choices[0].message.content or ""
        assert "<tools>" in text and '"name": "add"' in text and "<tool_call>" in text
        without = plain.chat.completions.create(model=MODEL_NAME, messages=_say("hi"))
        assert "<tools>" not in (without.choices[0].message.content or "")
        assert "You are a helpful AI assistant named SmolLM" in without.choices[0].message.content
