"""The tool-call types and the streaming parser base every format builds on.

A parser consumes decoded text into a buffer and only decides what a piece of it is (content
or a call) once no later text could change that decision. Deciding only on such stable
prefixes is what makes the streamed result independent of how the text was chunked, and
lets the non-streaming parse simply be "feed everything, then finish".
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from dynamo_run.protocol import json_input


@dataclass
class ToolCall:
    """One complete call, as OpenAI's ``message.tool_calls[i]`` carries it."""

    id: str
    name: str
    arguments: str  # JSON text of an object


@dataclass
class ToolCallDelta:
    """What one streamed chunk adds to ``delta.tool_calls[i]``."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def new_call_id() -> str:
    """A fresh OpenAI-style call id: unique per call, unguessable across requests."""
    return "call_" + secrets.token_hex(12)


def tool_names(tools: list[dict] | None) -> frozenset[str] | None:
    """Function names a request declares; None (no filtering) when it declares none."""
    if not tools:
        return None
    names = set()
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        if isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return frozenset(names)


def partial_marker(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def arguments_json(value: object, missing_ok: bool = True) -> str | None:
    """Normalise a call's arguments to the JSON text of an object, or None if they are not one.

    Models sometimes emit the arguments as a JSON string holding the object; that is accepted.
    """
    if value is None and missing_ok:
        value = {}
    if isinstance(value, str):
        try:
            value = json_input.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):  # NaN, or a Python value JSON cannot hold (pythonic sets)
        return None


class ToolCallParser:
    """Split one answer's text, fed as it is decoded, into content and tool calls.

    Subclasses implement ``_step``; this class owns the buffer, the emitted calls and the
    rule that whatever is undecided at the end is content (never lost, never a half call).
    """

    def __init__(self, tools: list[dict] | None = None) -> None:
        self._names = tool_names(tools)
        self._buf = ""
        self._calls: list[ToolCall] = []
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._finished = False

    @property
    def calls(self) -> list[ToolCall]:
        """The complete calls parsed so far, in order."""
        return list(self._calls)

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Add decoded text; return the content safe to show now and the new call deltas."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """End of generation: decide everything still held back."""
        if self._finished:
            return "", []
        out = self._drain(final=True)
        self._finished = True
        return out

    def _drain(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        self._content, self._deltas = [], []
        while self._step(final):
            pass
        if final and self._buf:
            self._text(len(self._buf))
        return "".join(self._content), self._deltas

    def _step(self, final: bool) -> bool:
        """Consume a decidable prefix of the buffer; return whether anything changed."""
        raise NotImplementedError

    # helpers for subclasses

    def _text(self, n: int) -> None:
        """Emit the first ``n`` buffered characters as content."""
        if n > 0:
            self._content.append(self._buf[:n])
            self._buf = self._buf[n:]

    def _drop(self, n: int) -> None:
        self._buf = self._buf[n:]

    def _make_call(
        self, name: object, arguments: object, missing_ok: bool = True
    ) -> ToolCall | None:
        """A call from a parsed name and arguments, or None if it is not a valid known call."""
        if not isinstance(name, str) or not name:
            return None
        if self._names is not None and name not in self._names:
            return None
        args = arguments_json(arguments, missing_ok)
        if args is None:
            return None
        return ToolCall(id=new_call_id(), name=name, arguments=args)

    def _call_from_object(self, obj: object, missing_ok: bool = True) -> ToolCall | None:
        """A call from ``{"name": ..., "arguments"|"parameters": {...}}``."""
        if not isinstance(obj, dict) or "name" not in obj:
            return None
        key = "arguments" if "arguments" in obj else "parameters"
        if key not in obj and not missing_ok:
            return None
        return self._make_call(obj["name"], obj.get(key), missing_ok)

    def _emit(self, calls: list[ToolCall]) -> None:
        """Record complete calls and stream each as one delta (id, name, whole arguments)."""
        for call in calls:
            self._deltas.append(
                ToolCallDelta(
                    index=len(self._calls), id=call.id, name=call.name, arguments=call.arguments
                )
            )
            self._calls.append(call)
