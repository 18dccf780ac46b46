"""Chat requests with tools / response_format -> guided-decoding fields and output plan
(pure: no engine), the template's view of tool turns, and the answer parser."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from conftest import REPO

from dynamo_run.distributed.wire import InstanceRecord, decode_record, encode_record
from dynamo_run.echo import EchoEngine
from dynamo_run.errors import RequestError
from dynamo_run.model.card import CardOverrides
from dynamo_run.model.card_wire import card_from_bytes, card_to_bytes
from dynamo_run.pipeline.answer import AnswerParser, OutputPlan
from dynamo_run.pipeline.chat_plan import plan_chat, unenforced_keywords
from dynamo_run.pipeline.client import ModelClient
from dynamo_run.protocol.openai import ChatCompletionRequest

HERMES = (REPO / "tests" / "templates" / "hermes_tools.jinja").read_text()
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}},
    {"type": "function", "function": {"name": "now"}},
]


@pytest.fixture()
def card(default_card):
    """A fresh copy of the default card (the session one must not be changed)."""
    return card_from_bytes(card_to_bytes(default_card))


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def test_named_choice_builds_the_call_schema(card) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    g = plan_chat(chat(tools=TOOLS, tool_choice=choice), card, True, True)
    assert g.json_schema == {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "arguments": PARAMS},
        "required": ["name", "arguments"],
    }
    assert g.plan is not None and g.plan.tool_parser == "json" and g.plan.forced


def test_required_is_any_tool_and_parallel_an_array(card) -> None:
    g = plan_chat(chat(tools=TOOLS, tool_choice="required"), card, True, True)
    assert g.json_schema is not None
    names = [s["properties"]["name"]["const"] for s in g.json_schema["anyOf"]]
    assert names == ["get_weather", "now"]
    # A tool without parameters takes an empty object.
    assert g.json_schema["anyOf"][1]["properties"]["arguments"]["properties"] == {}
    g = plan_chat(
        chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=True), card, True, True
    )
    assert g.json_schema["type"] == "array" and g.json_schema["minItems"] == 1


def test_auto_uses_the_flag_then_the_template(card) -> None:
    # The built-in model's template carries a Hermes tool branch: detected with no flag.
    assert plan_chat(chat(tools=TOOLS), card, True, True).plan.tool_parser == "hermes"
    CardOverrides(chat_template="{{ messages[-1].content }}").apply(card)
    with pytest.raises(RequestError, match="--tool-call-parser"):
        plan_chat(chat(tools=TOOLS), card, True, True)
    CardOverrides(chat_template=HERMES).apply(card)
    g = plan_chat(chat(tools=TOOLS), card, True, True)
    assert g.plan is not None and g.plan.tool_parser == "hermes" and g.json_schema is None
    card.tool_call_parser = "pythonic"
    assert plan_chat(chat(tools=TOOLS), card, True, True).plan.tool_parser == "pythonic"
    assert plan_chat(chat(tools=TOOLS, tool_choice="none"), card, True, True).plan is None


def test_engines_without_guided_decoding_refuse(card) -> None:
    with pytest.raises(RequestError, match="out=echo"):
        plan_chat(chat(tools=TOOLS, tool_choice="required"), card, False, False, "echo")
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with pytest.raises(RequestError, match="json_schema is not supported"):
        plan_chat(chat(response_format=fmt), card, True, False)
    with pytest.raises(RequestError, match="json_object is not supported"):
        plan_chat(chat(response_format={"type": "json_object"}), card, False, False)
    assert plan_chat(chat(response_format=fmt), card, False, True).json_schema == {"type": "object"}


def test_strict_refuses_what_no_engine_enforces(card) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}
    assert unenforced_keywords(schema) == ["'minimum' at $.properties.n"]
    assert unenforced_keywords({"type": "string", "format": "email"}) == ["format 'email' at $"]
    fmt = {"type": "json_schema", "json_schema": {"schema": schema, "strict": True}}
    with pytest.raises(RequestError, match="minimum"):
        plan_chat(chat(response_format=fmt), card, True, True)
    fmt["json_schema"]["strict"] = False
    assert plan_chat(chat(response_format=fmt), card, True, True).json_schema == schema
    strict_tool = [
        {"type": "function", "function": {"name": "f", "strict": True, "parameters": schema}}
    ]
    with pytest.raises(RequestError, match="minimum"):
        plan_chat(chat(tools=strict_tool, tool_choice="required"), card, True, True)


def test_reasoning_is_not_parsed_from_constrained_output(card) -> None:
    card.reasoning_parser = "deepseek_r1"
    assert plan_chat(chat(), card, True, True).plan.reasoning_parser == "deepseek_r1"
    g = plan_chat(chat(response_format={"type": "json_object"}), card, True, True)
    assert g.json_object and g.plan is None


def test_tool_turns_reach_the_template_with_object_arguments(card) -> None:
    CardOverrides(chat_template=HERMES).apply(card)
    client = ModelClient(card, EchoEngine(0))
    req = ChatCompletionRequest(
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "-3C, snow"},
        ],
        tools=TOOLS,
    )
    prepared = client.prepare_chat(req)
    prompt = prepared.prompt_text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in prompt
    assert "<tool_response>-3C, snow</tool_response>" in prompt
    assert json.dumps(TOOLS[0]) in prompt  # the tools are described to the model
    # The echo engine answers with the prompt: its calls are parsed (hermes, detected).
    done = asyncio.run(client.complete(prepared))
    assert [c.name for c in done.tool_calls] == ["get_weather"]
    assert done.finish_reason == "tool_calls"
    assert len(done.token_ids) == done.completion_tokens  # held-back text's tokens too


def test_answer_parser_feeds_reasoning_then_tools() -> None:
    parser = AnswerParser(OutputPlan(tool_parser="hermes", reasoning_parser="qwen3"))
    text = '<think>sum</think>ok <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    parts = [parser.feed(text[i : i + 3]) for i in range(0, len(text), 3)] + [parser.finish()]
    assert "".join(p.reasoning for p in parts) == "sum"
    assert "".join(p.content for p in parts).strip() == "ok"
    calls = [c for p in parts for c in p.tool_calls]
    assert [(c.index, c.name) for c in calls] == [(0, "add")] and parser.called


def test_guided_decoding_support_travels_in_the_instance_record() -> None:
    record = InstanceRecord(
        "i", "ns", "c", "e", "s", "m", "llamacpp", "h", 1, "d", 0.0, 0.0, 5.0,
        supports_json_object=True, supports_json_schema=True,
    )  # fmt: skip
    back = decode_record(encode_record(record))
    assert back.supports_json_object and back.supports_json_schema
    old = msgspec.json.encode(
        {k: v for k, v in msgspec.to_builtins(record).items() if "supports" not in k}
    )
    assert not decode_record(old).supports_json_schema  # older workers: not supported


def test_card_wire_keeps_parsers(card) -> None:
    CardOverrides(HERMES, "hermes", "qwen3").apply(card)
    back = card_from_bytes(card_to_bytes(card))
    assert (back.tool_call_parser, back.reasoning_parser) == ("hermes", "qwen3")
    assert back.chat_template.source == HERMES
