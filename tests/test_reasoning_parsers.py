"""Reasoning parsers: <think> splitting, streamed under any chunking and not."""

from __future__ import annotations

import itertools
import random

import pytest

from dynamo_run.parsers import (
    REASONING_PARSERS,
    detect_reasoning_parser,
    parse_tool_calls,
    reasoning_parser,
    split_reasoning,
    tool_call_parser,
)


def chunkings(text: str) -> list[list[str]]:
    out = [[text], list(text)]
    for size in (2, 3, 5):
        out.append([text[i : i + size] for i in range(0, len(text), size)])
    for seed in range(5):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 5))) if text else []
        bounds = [0, *cuts, len(text)]
        out.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return out


# (parser, text, expected reasoning, expected content)
CASES = [
    (
        "deepseek_r1",
        "Let me think.\nOK.\n</think>\n\nThe answer is 4.",
        "Let me think.\nOK.",
        "The answer is 4.",
    ),
    ("deepseek_r1", "<think>\nhmm</think>Yes", "hmm", "Yes"),
    (
        "deepseek_r1",
        "  <think>a < b </thinking> c</think>  x </think> y",
        "a < b </thinking> c",
        "x </think> y",
    ),
    ("deepseek_r1", "still thinking when cut off\n", "still thinking when cut off", ""),
    ("deepseek_r1", "<think>\n\n</think>\n\nDirect answer.", None, "Direct answer."),
    ("deepseek_r1", "reasoning ends at </thi", "reasoning ends at </thi", ""),
    ("deepseek_r1", "", None, ""),
    ("qwen3", "<think>\nI should greet.\n</think>\n\nHello!", "I should greet.", "Hello!"),
    ("qwen3", "Hello! No thinking here.", None, "Hello! No thinking here."),
    ("qwen3", "  Hello", None, "  Hello"),
    ("qwen3", "<think>\n\n</think>\n\nHi", None, "Hi"),
    ("qwen3", "<think>unclosed to the end", "unclosed to the end", ""),
    ("qwen3", "<thinking> is not the tag", None, "<thinking> is not the tag"),
    (
        "qwen3",
        "Text first <think>not reasoning</think>",
        None,
        "Text first <think>not reasoning</think>",
    ),
    ("qwen3", "answer</think>tail", None, "answer</think>tail"),
    ("qwen3", "<thi", None, "<thi"),
]


@pytest.mark.parametrize("name,text,reasoning,content", CASES)
def test_split_reasoning(name, text, reasoning, content):
    assert split_reasoning(name, text) == (reasoning, content)


@pytest.mark.parametrize("name,text,reasoning,content", CASES)
def test_streaming_matches_split(name, text, reasoning, content):
    for chunks in chunkings(text):
        parser = reasoning_parser(name)
        got_r, got_c = "", ""
        for chunk in chunks:
            r, c = parser.feed(chunk)
            got_r += r
            got_c += c
        r, c = parser.finish()
        assert (got_r + r, got_c + c) == (reasoning or "", content), chunks


def test_reasoning_streams_as_it_arrives_and_holds_only_a_possible_tag():
    parser = reasoning_parser("deepseek_r1")
    assert parser.feed("<think>\nFirst") == ("First", "")
    assert parser.feed(" idea </th") == (" idea", "")
    assert parser.feed("ink>\n") == ("", "")
    assert parser.feed("\nAnswer") == ("", "Answer")
    assert parser.finish() == ("", "")


def test_qwen3_holds_only_a_possible_opening_tag():
    parser = reasoning_parser("qwen3")
    assert parser.feed("<th") == ("", "")
    assert parser.feed("e answer") == ("", "<the answer")


def test_unknown_reasoning_parser_lists_the_choices():
    with pytest.raises(ValueError) as err:
        reasoning_parser("nope")
    assert set(REASONING_PARSERS) >= {"deepseek_r1", "qwen3"}
    for name in REASONING_PARSERS:
        assert name in str(err.value)


def test_feed_after_finish_is_an_error():
    parser = reasoning_parser("qwen3")
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


def test_content_after_reasoning_feeds_a_tool_call_parser():
    """The pipeline chains them: reasoning first, then tool calls in the content."""
    text = (
        "<think>The user wants weather; call <tool_call> now.</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    for chunks in chunkings(text):
        rp, tp = reasoning_parser("qwen3"), tool_call_parser("hermes")
        reasoning, content = "", ""
        for chunk in [*chunks, None]:
            r, c = rp.feed(chunk) if chunk is not None else rp.finish()
            reasoning += r
            out, _ = tp.feed(c)
            content += out
        out, _ = tp.finish()
        content += out
        assert reasoning == "The user wants weather; call <tool_call> now."
        assert content == ""
        assert [(c.name, c.arguments) for c in tp.calls] == [("get_weather", '{"city": "Oslo"}')]
    _, body = split_reasoning("qwen3", text)
    assert parse_tool_calls("hermes", body)[1][0].name == "get_weather"


@pytest.mark.parametrize(
    "template,expected",
    [
        ("{%- if enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}", "qwen3"),
        ("{% set content = content.split('</think>')[-1] %}<|Assistant|><think>\\n", "deepseek_r1"),
        ("{{ messages }}", None),
        (None, None),
    ],
)
def test_detect_reasoning_parser(template, expected):
    assert detect_reasoning_parser(template) == expected
