"""Tool-call parsing: choose a format by name, or detect it from a chat template.

Every format streams through the same ``ToolCallParser`` interface; ``parse_tool_calls`` is
that parser fed the whole text at once, so streamed and non-streamed results agree.
"""

from __future__ import annotations

from ._base import ToolCall, ToolCallDelta, ToolCallParser, new_call_id
from .hermes import HermesParser
from .json_calls import JsonParser, Llama3JsonParser
from .mistral import MistralParser
from .pythonic import PythonicParser

__all__ = [
    "TOOL_CALL_PARSERS",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "detect_tool_call_parser",
    "new_call_id",
    "parse_tool_calls",
    "tool_call_parser",
]

_PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
    "json": JsonParser,
}
TOOL_CALL_PARSERS: tuple[str, ...] = tuple(_PARSERS)


def tool_call_parser(name: str, tools: list[dict] | None = None) -> ToolCallParser:
    """A fresh parser for one answer; ``tools`` (OpenAI tools list) limits the callable names."""
    try:
        cls = _PARSERS[name]
    except KeyError:
        known = ", ".join(TOOL_CALL_PARSERS)
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of: {known}") from None
    return cls(tools)


def parse_tool_calls(
    name: str, text: str, tools: list[dict] | None = None
) -> tuple[str, list[ToolCall]]:
    """Non-streaming parse of a whole answer: (remaining content text, calls)."""
    parser = tool_call_parser(name, tools)
    content, _ = parser.feed(text)
    tail, _ = parser.finish()
    return content + tail, parser.calls


# Template fragments that identify a format. A template that matches several formats is
# ambiguous and gets no parser rather than a guess.
_TEMPLATE_SIGNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mistral", ("[TOOL_CALLS]",)),
    ("hermes", ("<tool_call>",)),
    ("llama3_json", ("<|python_tag|>", '"parameters": dictionary of argument name')),
    ("pythonic", ("[func_name1(",)),
)


def detect_tool_call_parser(chat_template: str | None) -> str | None:
    """The tool-call format a chat template teaches, when exactly one format matches."""
    if not chat_template:
        return None
    found = {name for name, signs in _TEMPLATE_SIGNS if any(s in chat_template for s in signs)}
    return found.pop() if len(found) == 1 else None
