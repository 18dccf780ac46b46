"""JSON-object formats: llama3_json (Llama 3.x custom tools) and json (forced calls)."""

from __future__ import annotations

from dynamo_run.protocol import json_input

from ._base import ToolCall
from ._leading import LeadingParser


class Llama3JsonParser(LeadingParser):
    """``[<|python_tag|>]{"name": ..., "parameters": {...}}[; {...}]`` opening the answer.

    The arguments key is required: a bare ``{"name": ...}`` is far more likely an answer
    about a name than a call.
    """

    START_TAGS = ("<|python_tag|>",)
    SEPARATOR = ";"

    def _parse_value(self, text: str) -> list[ToolCall]:
        try:
            obj = json_input.loads(text)
        except ValueError:
            return []
        call = self._call_from_object(obj, missing_ok=False)
        return [call] if call else []


class JsonParser(LeadingParser):
    """The whole answer is one call object or a list of them (a JSON-schema grammar forced it)."""

    OPENERS = "{["

    def _parse_value(self, text: str) -> list[ToolCall]:
        try:
            value = json_input.loads(text)
        except ValueError:
            return []
        items = value if isinstance(value, list) else [value]
        calls = [self._call_from_object(item) for item in items]
        return calls if calls and all(calls) else []
