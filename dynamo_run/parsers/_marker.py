"""Formats whose calls open with a marker the model emits (hermes, mistral).

Text before a marker is content. Once a marker is seen the text is held until the call is
complete and valid (then it becomes calls) or cannot be (then it is content, marker and
all). Whitespace between and after calls is a separator and is dropped.
"""

from __future__ import annotations

from ._base import ToolCall, ToolCallParser, partial_marker


class MarkerParser(ToolCallParser):
    """Content / marker / call state machine shared by marker-introduced formats."""

    MARKER = ""

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = "text"  # "text" | "call" (buffer starts with MARKER) | "after"

    def _step(self, final: bool) -> bool:
        if self._state == "after":
            stripped = self._buf.lstrip()
            self._drop(len(self._buf) - len(stripped))
            if not self._buf:
                return False
            self._state = "text"
            return True
        if self._state == "text":
            i = self._buf.find(self.MARKER)
            if i < 0:
                hold = 0 if final else partial_marker(self._buf, self.MARKER)
                self._text(len(self._buf) - hold)
                return False
            self._text(i)
            self._state = "call"
            self._start_call()
            return True
        result = self._parse_call(final)
        if result is None:
            return False
        end, calls = result
        if calls:
            self._emit(calls)
            self._drop(end)
            self._state = "after"
        else:
            self._text(max(end, len(self.MARKER)))
            self._state = "text"
        return True

    def _start_call(self) -> None:
        """Reset per-call scanning state; the buffer now starts with the marker."""

    def _parse_call(self, final: bool) -> tuple[int, list[ToolCall]] | None:
        """None to wait for more text, else (characters consumed, calls; empty = not a call)."""
        raise NotImplementedError
