"""Tool-call parsers: every format, valid, malformed and partial, streamed under any chunking."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from dynamo_run.parsers import (
    TOOL_CALL_PARSERS,
    ToolCall,
    ToolCallDelta,
    detect_tool_call_parser,
    parse_tool_calls,
    tool_call_parser,
)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {}}},
]


def chunkings(text: str) -> list[list[str]]:
    """Whole, char by char, fixed sizes and seeded random splits of ``text``."""
    out = [[text], list(text)]
    for size in (2, 3, 7):
        out.append([text[i : i + size] for i in range(0, len(text), size)])
    for seed in range(5):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 6))) if text else []
        bounds = [0, *cuts, len(text)]
        out.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return out


def stream(name: str, chunks: list[str], tools=None):
    parser = tool_call_parser(name, tools)
    content, deltas = "", []
    for chunk in chunks:
        text, new = parser.feed(chunk)
        content += text
        deltas += new
    text, new = parser.finish()
    return content + text, deltas + new, parser.calls


def check_deltas(deltas: list[ToolCallDelta], calls: list[ToolCall]) -> None:
    """Deltas are what OpenAI streams: per index, id+name first, fragments join to arguments."""
    assert sorted({d.index for d in deltas}) == list(range(len(calls)))
    for i, call in enumerate(calls):
        mine = [d for d in deltas if d.index == i]
        assert mine[0].id == call.id and mine[0].name == call.name
        assert all(d.id is None and d.name is None for d in mine[1:])
        assert "".join(d.arguments for d in mine) == call.arguments
    indices = [d.index for d in deltas]
    assert indices == sorted(indices)


def shape(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


# (format, text, tools, expected content, expected [(name, arguments)])
CASES = [
    # hermes
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>",
        None,
        "Let me check.\n",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n',
        TOOLS,
        "",
        [("get_weather", {"city": "Paris"}), ("get_time", {})],
    ),
    (  # strings holding brackets and the closing tag itself
        "hermes",
        '<tool_call>{"name": "f", "arguments": {"s": "}]</tool_call>\\"{"}}</tool_call>',
        None,
        "",
        [("f", {"s": '}]</tool_call>"{'})],
    ),
    (  # no closing tag: generation stopped right after the JSON
        "hermes",
        '<tool_call>\n{"name": "f", "arguments": {"a": [1, 2]}}\n',
        None,
        "",
        [("f", {"a": [1, 2]})],
    ),
    (  # closing tag cut short
        "hermes",
        '<tool_call>{"name": "f", "arguments": {}}</tool_c',
        None,
        "",
        [("f", {})],
    ),
    (  # arguments given as a JSON string; missing arguments
        "hermes",
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
        '<tool_call>{"name": "g"}</tool_call>',
        None,
        "",
        [("f", {"a": 1}), ("g", {})],
    ),
    (  # text after the calls is content, the separating whitespace is not
        "hermes",
        'A<tool_call>{"name": "f", "arguments": {"x": "é"}}</tool_call>\n\nDone.',
        None,
        "ADone.",
        [("f", {"x": "é"})],
    ),
    (  # malformed JSON stays text, the next call still parses
        "hermes",
        '<tool_call>\n{"name": "f", "arguments": {oops}}\n</tool_call>'
        '<tool_call>{"name": "g", "arguments": {}}</tool_call>',
        None,
        '<tool_call>\n{"name": "f", "arguments": {oops}}\n</tool_call>',
        [("g", {})],
    ),
    (  # truncated mid-JSON: all text, never half a call
        "hermes",
        'Sure. <tool_call>\n{"name": "f", "arguments": {"a": "unfinish',
        None,
        'Sure. <tool_call>\n{"name": "f", "arguments": {"a": "unfinish',
        [],
    ),
    (  # unknown function stays text
        "hermes",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
        TOOLS,
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
        [],
    ),
    (  # the tag in prose, not followed by JSON
        "hermes",
        "Models emit <tool_call> tags; a <tool_",
        None,
        "Models emit <tool_call> tags; a <tool_",
        [],
    ),
    (  # JSON followed by something other than the closing tag
        "hermes",
        '<tool_call>{"name": "f", "arguments": {}} and more',
        None,
        '<tool_call>{"name": "f", "arguments": {}} and more',
        [],
    ),
    (  # a list of calls inside one tag
        "hermes",
        '<tool_call>[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"b": 1}}]'
        "</tool_call>",
        None,
        "",
        [("f", {}), ("g", {"b": 1})],
    ),
    ("hermes", "<tool_call>[]</tool_call>", None, "<tool_call>[]</tool_call>", []),
    ("hermes", "plain answer", None, "plain answer", []),
    ("hermes", "", None, "", []),
    # llama3_json
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        TOOLS,
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "f", "arguments": {"a": 1}}; {"name": "g", "parameters": {}};',
        None,
        "",
        [("f", {"a": 1}), ("g", {})],
    ),
    (
        "llama3_json",
        '\n  {"name": "f", "parameters": {"a": "{;}"}}\nThat is all.',
        None,
        "That is all.",
        [("f", {"a": "{;}"})],
    ),
    (  # prose first: the later call-shaped JSON is content
        "llama3_json",
        'Call it like {"name": "f", "parameters": {}}',
        None,
        'Call it like {"name": "f", "parameters": {}}',
        [],
    ),
    (  # an answer that is JSON but not a call
        "llama3_json",
        '{"name": "John", "age": 3}',
        None,
        '{"name": "John", "age": 3}',
        [],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "f", "parameters": {a: 1}}',
        None,
        '<|python_tag|>{"name": "f", "parameters": {a: 1}}',
        [],
    ),
    ("llama3_json", '{"name": "f", "parame', None, '{"name": "f", "parame', []),
    ("llama3_json", "<|python_ta", None, "<|python_ta", []),
    (
        "llama3_json",
        '{"name": "nope", "parameters": {}}',
        TOOLS,
        '{"name": "nope", "parameters": {}}',
        [],
    ),
    (  # second call malformed: first stands, the rest is text
        "llama3_json",
        '{"name": "f", "parameters": {}}; {"name": "g", "parameters": [}',
        None,
        '{"name": "g", "parameters": [}',
        [("f", {})],
    ),
    # mistral
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {}}]',
        TOOLS,
        "",
        [("get_weather", {"city": "Paris"}), ("get_time", {})],
    ),
    (
        "mistral",
        'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
        "[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{}",
        TOOLS,
        "Checking.",
        [("get_weather", {"city": "Paris"}), ("get_time", {})],
    ),
    (  # [ARGS] left out, whitespace before the object
        "mistral",
        '[TOOL_CALLS]get_time{}[TOOL_CALLS] get_weather[ARGS] {"city": "Oslo"}',
        TOOLS,
        "",
        [("get_time", {}), ("get_weather", {"city": "Oslo"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}]',
        None,
        '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}]',
        [],
    ),
    (
        "mistral",
        "[TOOL_CALLS] is the marker Mistral uses.",
        None,
        "[TOOL_CALLS] is the marker Mistral uses.",
        [],
    ),
    (
        "mistral",
        '[TOOL_CALLS]f[ARGS]{"a": "cut',
        None,
        '[TOOL_CALLS]f[ARGS]{"a": "cut',
        [],
    ),
    (  # one unknown name in the list: the whole list stays text
        "mistral",
        '[TOOL_CALLS][{"name": "get_time", "arguments": {}}, {"name": "x", "arguments": {}}]',
        TOOLS,
        '[TOOL_CALLS][{"name": "get_time", "arguments": {}}, {"name": "x", "arguments": {}}]',
        [],
    ),
    ("mistral", "[TOOL_CALL", None, "[TOOL_CALL", []),
    # pythonic
    (
        "pythonic",
        '[get_weather(city="Paris", days=3), get_time()]',
        TOOLS,
        "",
        [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})],
    ),
    (
        "pythonic",
        "<|python_start|>[f(a=[1, (2, 3)], b={'k': None}, c=True, s='])\\'\"', "
        't="""x"y]""")]<|python_end|>',
        None,
        "",
        [("f", {"a": [1, [2, 3]], "b": {"k": None}, "c": True, "s": "])'\"", "t": 'x"y]'})],
    ),
    (  # only literals: a name or a call as a value is not a call, it is text
        "pythonic",
        "[f(a=__import__('os').system('x'))]",
        None,
        "[f(a=__import__('os').system('x'))]",
        [],
    ),
    ("pythonic", "[f(1, 2)]", None, "[f(1, 2)]", []),
    ("pythonic", "[f(a={1, 2})]", None, "[f(a={1, 2})]", []),
    ("pythonic", "[1] Smith et al.", None, "[1] Smith et al.", []),
    ("pythonic", "Use [f(a=1)] to call.", None, "Use [f(a=1)] to call.", []),
    ("pythonic", "[f(a='open", None, "[f(a='open", []),
    ("pythonic", "[other(a=1)]", TOOLS, "[other(a=1)]", []),
    ("pythonic", "[f(a=1)]\nDone.", None, "Done.", [("f", {"a": 1})]),
    (  # one end tag per call list; a second is text
        "pythonic",
        "[f(a=1)]<|python_end|> <|python_end|>",
        None,
        "<|python_end|>",
        [("f", {"a": 1})],
    ),
    # json (forced calls)
    (
        "json",
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        TOOLS,
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "json",
        ' [{"name": "f", "parameters": {"a": 1}}, {"name": "g", "arguments": {}}]',
        None,
        "",
        [("f", {"a": 1}), ("g", {})],
    ),
    ("json", '{"name": "f", "arguments": 3}', None, '{"name": "f", "arguments": 3}', []),
    ("json", "[]", None, "[]", []),
    ("json", "Hello", None, "Hello", []),
    ("json", '{"name": "f", "arg', None, '{"name": "f", "arg', []),
]


@pytest.mark.parametrize(
    "fmt,text,tools,content,calls", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_parse_tool_calls(fmt, text, tools, content, calls):
    got_content, got_calls = parse_tool_calls(fmt, text, tools)
    assert got_content == content
    assert shape(got_calls) == calls
    for call in got_calls:
        assert json.loads(call.arguments) is not None


@pytest.mark.parametrize(
    "fmt,text,tools,content,calls", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_streaming_matches_non_streaming(fmt, text, tools, content, calls):
    for chunks in chunkings(text):
        assert "".join(chunks) == text
        got_content, deltas, got_calls = stream(fmt, chunks, tools)
        assert got_content == content, chunks
        assert shape(got_calls) == calls, chunks
        check_deltas(deltas, got_calls)


def test_content_before_a_marker_streams_at_once_and_a_partial_marker_is_held():
    parser = tool_call_parser("hermes")
    assert parser.feed("Hello <tool") == ("Hello ", [])
    assert parser.feed("s are neat") == ("<tools are neat", [])
    content, deltas = parser.feed('<tool_call>{"name": "f", "arguments": {"a": 1}}')
    assert content == "" and deltas == []
    content, deltas = parser.feed("</tool_call>")
    assert content == ""
    assert [(d.index, d.name, d.arguments) for d in deltas] == [(0, "f", '{"a": 1}')]
    assert deltas[0].id == parser.calls[0].id


@pytest.mark.parametrize(
    "fmt,opening",
    [
        ("llama3_json", "{ is a brace"),
        ("json", "[1, 2"),
        ("pythonic", "[1] Smith"),
        ("hermes", "<tool_call> tags wrap"),
        ("hermes", "<tool_call>{ x"),
        ("mistral", "[TOOL_CALLS] is the"),
        ("mistral", "[TOOL_CALLS][ 1"),
    ],
)
def test_prose_that_opens_like_a_call_streams_without_waiting_for_the_end(fmt, opening):
    parser = tool_call_parser(fmt)
    shown = "".join(parser.feed(ch)[0] for ch in opening)
    assert shown and opening.startswith(shown) and len(shown) >= len(opening) - 4


def test_call_is_emitted_as_soon_as_it_is_complete():
    parser = tool_call_parser("mistral")
    _, deltas = parser.feed('[TOOL_CALLS]f[ARGS]{"a": 1}')
    assert [d.name for d in deltas] == ["f"]
    _, deltas = parser.feed('[TOOL_CALLS]g[ARGS]{"b": 2')
    assert deltas == []
    _, deltas = parser.feed("}")
    assert [(d.index, d.name) for d in deltas] == [(1, "g")]


def test_ids_are_unique_and_openai_shaped():
    _, calls = parse_tool_calls(
        "hermes", "".join(f'<tool_call>{{"name": "f{i}"}}</tool_call>' for i in range(20))
    )
    assert len({c.id for c in calls}) == 20
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)


def test_mistral_ids_are_nine_alphanumerics():
    """Mistral's own chat templates reject any other tool-call id in the history."""
    _, calls = parse_tool_calls("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}]')
    assert re.fullmatch(r"[A-Za-z0-9]{9}", calls[0].id)


def test_arguments_are_normalised_json_objects():
    _, calls = parse_tool_calls("hermes", '<tool_call>{"name":"f","arguments":{"a":1,"b":"ü"}}')
    assert calls[0].arguments == json.dumps({"a": 1, "b": "ü"}, ensure_ascii=False)
    text = '<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>'
    assert parse_tool_calls("hermes", text) == (text, [])


def test_tools_in_plain_name_form_are_accepted():
    tools = [{"name": "f"}]
    assert parse_tool_calls("pythonic", "[f()]", tools)[1][0].name == "f"
    assert parse_tool_calls("pythonic", "[g()]", tools)[1] == []


def test_unknown_parser_name_lists_the_choices():
    with pytest.raises(ValueError) as err:
        tool_call_parser("nope")
    for name in TOOL_CALL_PARSERS:
        assert name in str(err.value)
    assert set(TOOL_CALL_PARSERS) >= {"hermes", "llama3_json", "mistral", "pythonic", "json"}


def test_feed_after_finish_is_an_error_and_finish_is_idempotent():
    parser = tool_call_parser("hermes")
    parser.feed("x")
    assert parser.finish() == ("", [])
    assert parser.finish() == ("", [])
    with pytest.raises(RuntimeError):
        parser.feed("y")


def test_calls_property_is_a_copy():
    parser = tool_call_parser("json")
    parser.feed('{"name": "f", "arguments": {}}')
    parser.calls.clear()
    assert len(parser.calls) == 1


def test_long_arguments_char_by_char_stay_linear():
    """A resumable bracket scan: feeding 200k characters one at a time must not be quadratic."""
    big = "x" * 200_000
    text = '<tool_call>{"name": "f", "arguments": {"s": "' + big + '"}}</tool_call>'
    parser = tool_call_parser("hermes")
    for ch in text:
        parser.feed(ch)
    parser.finish()
    assert json.loads(parser.calls[0].arguments) == {"s": big}


# Pieces a model might emit, well-formed or not, per format: random sequences of them, under
# random chunkings, must stream exactly as they parse in one go, and text that holds no call
# must come back unchanged.
PIECES = {
    "hermes": [
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
        "<tool_call>",
        "<tool_call>",
        "</tool_call>",
        "<tool_",
        "\n",
        " ",
        "Hi. ",
        '{"name": "f", "arguments": {"a": 1}}',
        '{"name": "g"}',
        '{"name": 3}',
        '{"a": "}"',
        "}",
        "[",
        "]",
        '"',
    ],
    "llama3_json": [
        "<|python_tag|>",
        "<|python",
        '{"name": "f", "parameters": {"a": [1]}}',
        '{"name": "g", "arguments": {}}',
        "; ",
        ";",
        " ",
        "\n",
        "{",
        "}",
        "text",
        '"',
    ],
    "mistral": [
        '[TOOL_CALLS]f[ARGS]{"a": 1}',
        '[TOOL_CALLS][{"name": "g", "arguments": {}}]',
        "[TOOL_CALLS]",
        "[TOOL_CALLS]",
        "[TOOL_",
        '[{"name": "f", "arguments": {}}]',
        "f[ARGS]",
        "g[CALL_ID]abc[ARGS]",
        "g",
        "[CALL_ID]",
        '{"a": 1}',
        "[ARGS]",
        " ",
        "x",
        "{",
        "]",
        '"',
    ],
    "pythonic": [
        "[f(a=1)]",
        "[g(s='x]'), f()]",
        "<|python_start|>",
        "<|python_end|>",
        "[",
        "]",
        "(",
        "'",
        '"""',
        " ",
        "text",
        "f(b=2)",
    ],
    "json": [
        '{"name": "f", "arguments": {}}',
        '[{"name": "g", "parameters": {"x": null}}]',
        "[",
        "{",
        "}",
        "]",
        " ",
        "text",
        '"',
        ",",
    ],
}


@pytest.mark.parametrize("fmt", TOOL_CALL_PARSERS)
def test_random_sequences_stream_as_they_parse(fmt):
    rng = random.Random(fmt)
    for _ in range(150):
        text = "".join(rng.choice(PIECES[fmt]) for _ in range(rng.randint(0, 8)))
        content, calls = parse_tool_calls(fmt, text)
        if not calls:
            assert content == text
        for chunks in chunkings(text)[:4] + chunkings(text)[-2:]:
            got_content, deltas, got_calls = stream(fmt, chunks)
            assert got_content == content, (text, chunks)
            assert shape(got_calls) == shape(calls), (text, chunks)
            check_deltas(deltas, got_calls)


QWEN = (
    "{%- if tools %}...<tools></tools>\\n\\nFor each function call, return a json object "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\\n</tool_call>{%- endif %}'
)
MISTRAL = "{%- if message.tool_calls %}[TOOL_CALLS][{%- for tool_call in ... %}"
LLAMA31 = (
    "{%- if builtin_tools is defined or tool_call %}<|python_tag|>{%- endif %}"
    '{"name": function name, "parameters": dictionary of argument name and its value}'
)
LLAMA32 = (
    '<|start_header_id|>ipython<|end_header_id|>Respond in the format {"name": function name, '
    '"parameters": dictionary of argument name and its value}.'
)
PYTHONIC = "[func_name1(params_name1=params_value1, params_name2=params_value2...)]"


@pytest.mark.parametrize(
    "template,expected",
    [
        (QWEN, "hermes"),
        (MISTRAL, "mistral"),
        (LLAMA31, "llama3_json"),
        (LLAMA32, "llama3_json"),
        (PYTHONIC, "pythonic"),
        ("{{ messages[0].content }}", None),
        (None, None),
        ("", None),
        (QWEN + MISTRAL, None),  # ambiguous: no guess
    ],
)
def test_detect_tool_call_parser(template, expected):
    assert detect_tool_call_parser(template) == expected
