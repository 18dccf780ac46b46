"""Hermes / Qwen format: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""

from __future__ import annotations

from dynamo_run.protocol import json_input

from ._base import ToolCall
from ._marker import MarkerParser
from ._scan import BracketScanner, first_inside, json_first_ok

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


class HermesParser(MarkerParser):
    """Calls wrapped in ``<tool_call>`` tags, any number, after optional content.

    The closing tag may be missing at the very end (models often stop right after the JSON).
    """

    MARKER = OPEN

    def _start_call(self) -> None:
        self._scanner: BracketScanner | None = None
        self._obj_end = 0

    def _parse_call(self, final: bool) -> tuple[int, list[ToolCall]] | None:
        buf = self._buf
        if self._scanner is None:
            start = len(buf) - len(buf[len(OPEN) :].lstrip())
            if start == len(buf):
                return (len(buf), []) if final else None
            if buf[start] not in "{[":
                return start, []
            ch = first_inside(buf, start)
            if ch is None:
                return (len(buf), []) if final else None
            if not json_first_ok(buf[start], ch):
                return start, []
            self._scanner = BracketScanner(start)
            self._obj_start = start
        if not self._obj_end:
            end = self._scanner.advance(buf)
            if end is None:
                return (len(buf), []) if final else None
            self._obj_end = end
        tail = buf[self._obj_end :]
        rest = tail.lstrip()
        close_at = len(buf) - len(rest)
        if rest.startswith(CLOSE):
            consumed = close_at + len(CLOSE)
        elif CLOSE.startswith(rest):
            if not final:
                return None
            consumed = len(buf)  # generation stopped before the closing tag: the JSON stands
        else:
            return self._obj_end, []
        return consumed, self._parse_body(buf[self._obj_start : self._obj_end])

    def _parse_body(self, body: str) -> list[ToolCall]:
        """One call object, or (some models do this) a list of them in one tag; all or none."""
        try:
            value = json_input.loads(body)
        except ValueError:
            return []
        items = value if isinstance(value, list) else [value]
        calls = [self._call_from_object(item) for item in items]
        return calls if calls and all(calls) else []
