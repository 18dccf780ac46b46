"""Formats where the answer itself is the call (llama3_json, json, pythonic).

Such an answer has no marker, so a call is only recognised when it opens the answer (after
whitespace and an optional tag). Anything else, including prose that mentions a call-shaped
value later on, is content from the first character.
"""

from __future__ import annotations

from ._base import ToolCall, ToolCallParser
from ._scan import BracketScanner, first_inside, json_first_ok


class LeadingParser(ToolCallParser):
    """Calls as leading bracketed values, optionally separated; the rest is content."""

    START_TAGS: tuple[str, ...] = ()  # optional tag before the first value
    END_TAGS: tuple[str, ...] = ()  # optional tag after a value, dropped
    OPENERS = "{"
    SEPARATOR = ""  # between values, e.g. ";"
    QUOTES = '"'
    TRIPLE = False

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = "start"  # "start" | "value" | "sep" | "text"
        self._scanner = BracketScanner(0)
        self._start = 0
        self._checked = False
        self._tag_ended = False

    def _step(self, final: bool) -> bool:
        buf = self._buf
        if self._state == "text":
            self._text(len(buf))
            return False
        if self._state == "start":
            return self._step_start(final)
        if self._state == "value":
            if not self._checked:
                ch = first_inside(buf, self._start)
                if ch is None:
                    return False
                if not self._first_ok(buf[self._start], ch):
                    self._state = "text"
                    return True
                self._checked = True
            end = self._scanner.advance(buf)
            if end is None:
                return False
            calls = self._parse_value(buf[self._start : end])
            if not calls:
                self._state = "text"
                return True
            self._emit(calls)
            self._drop(end)
            self._state = "sep"
            return True
        return self._step_sep(final)

    def _step_start(self, final: bool) -> bool:
        s = self._buf.lstrip()
        for tag in self.START_TAGS:
            if s.startswith(tag):
                s = s[len(tag) :].lstrip()
                break
            if tag.startswith(s) and not final:
                return False
        if not s:
            return False
        if s[0] in self.OPENERS:
            self._begin_value(len(self._buf) - len(s))
        else:
            self._state = "text"
        return True

    def _step_sep(self, final: bool) -> bool:
        s = self._buf.lstrip()
        for tag in () if self._tag_ended else self.END_TAGS:
            if s.startswith(tag):
                s = s[len(tag) :].lstrip()
                self._tag_ended = True  # one end tag per value; a second one is text
                break
            if tag.startswith(s) and s and not final:
                return False
        self._drop(len(self._buf) - len(s))
        if not s:
            return False
        if self.SEPARATOR and s.startswith(self.SEPARATOR):
            after = s[len(self.SEPARATOR) :].lstrip()
            if not after:
                if final:
                    self._drop(len(s))  # a dangling separator is not content
                return False
            if after[0] in self.OPENERS:
                self._drop(len(s) - len(after))
                self._begin_value(0)
                return True
        self._state = "text"
        return True

    def _begin_value(self, start: int) -> None:
        self._state = "value"
        self._checked = False
        self._tag_ended = False
        self._start = start
        self._scanner = BracketScanner(start, self.QUOTES, self.TRIPLE)

    def _first_ok(self, opener: str, ch: str) -> bool:
        """Whether a value opened by ``opener`` may go on with ``ch``; False makes it text."""
        return json_first_ok(opener, ch)

    def _parse_value(self, text: str) -> list[ToolCall]:
        """The calls a complete value holds; empty when it is not (all) valid calls."""
        raise NotImplementedError
