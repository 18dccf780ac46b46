"""Mistral format: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` and the newer
``[TOOL_CALLS]name[ARGS]{...}`` (optionally ``name[CALL_ID]id[ARGS]{...}``), one marker per call.
"""

from __future__ import annotations

import re
import secrets
import string

from dynamo_run.protocol import json_input

from ._base import ToolCall
from ._marker import MarkerParser
from ._scan import BracketScanner, first_inside

MARKER = "[TOOL_CALLS]"
# name, an optional [CALL_ID]id, [ARGS] (some renderings omit it), then the arguments object.
_NAME_FORM = re.compile(r"([\w.\-]+)(?:\[CALL_ID\][\w\-]*)?(?:\[ARGS\])?\s*(?=\{)")
_NAME_CHARS = re.compile(r"[\w.\-]*")
_ID_CHARS = re.compile(r"[\w\-]*")
_ALNUM = string.ascii_letters + string.digits


def mistral_call_id() -> str:
    """Mistral's chat templates reject tool-call ids that are not 9 alphanumerics."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


def _could_become_name_form(text: str) -> bool:
    """Whether some continuation of ``text`` matches ``_NAME_FORM`` (else: not a call)."""
    rest = text[_NAME_CHARS.match(text).end() :]
    for tag, tail in (("[CALL_ID]", _ID_CHARS), ("[ARGS]", None)):
        if rest.startswith(tag):
            rest = rest[len(tag) :]
            if tail is not None:
                rest = rest[tail.match(rest).end() :]
        elif rest and tag.startswith(rest):
            return True
    return not rest.lstrip()


class MistralParser(MarkerParser):
    """Calls after ``[TOOL_CALLS]``, as a JSON list or as ``name[ARGS]{...}``."""

    MARKER = MARKER

    def _start_call(self) -> None:
        self._scanner: BracketScanner | None = None
        self._value_start = 0
        self._name: str | None = None

    def _parse_call(self, final: bool) -> tuple[int, list[ToolCall]] | None:
        buf = self._buf
        if self._scanner is None:
            q = len(buf) - len(buf[len(MARKER) :].lstrip())
            if q == len(buf):
                return (len(buf), []) if final else None
            if buf[q] == "[":
                ch = first_inside(buf, q)
                if ch is None:
                    return (len(buf), []) if final else None
                if ch != "{":
                    return q, []
            else:
                m = _NAME_FORM.match(buf, q)
                if m is None:
                    if final or not _could_become_name_form(buf[q:]):
                        return q, []
                    return None
                self._name = m.group(1)
                q = m.end()
            self._scanner = BracketScanner(q)
            self._value_start = q
        end = self._scanner.advance(buf)
        if end is None:
            return (len(buf), []) if final else None
        try:
            value = json_input.loads(buf[self._value_start : end])
        except ValueError:
            return end, []
        if self._name is not None:
            call = self._make_call(self._name, value)
            return end, [call] if call else []
        if not isinstance(value, list) or not value:
            return end, []
        calls = [self._call_from_object(item) for item in value]
        if not all(calls):
            return end, []
        return end, calls

    def _make_call(
        self, name: object, arguments: object, missing_ok: bool = True
    ) -> ToolCall | None:
        call = super()._make_call(name, arguments, missing_ok)
        if call is not None:
            call.id = mistral_call_id()
        return call
