"""Decoding the JSON a client sends (HTTP bodies, gRPC ``sampling_parameters``, batch lines),
with a bound on how deeply it may nest.

Without one, a small body such as ``{"messages": [[[[...]]]]}`` (100k levels) makes
``json.loads`` raise RecursionError, and a nesting just under the interpreter's recursion limit
makes pydantic's validation, the chat template or ``json.dumps`` raise it later instead.
Rejecting nesting past :data:`MAX_DEPTH` where the text is decoded keeps every later step
within bounds. 128 is serde_json's recursion limit, which Dynamo's own frontend applies; no
OpenAI request nests half as deep (a tool's JSON schema adds two levels per object).
"""

from __future__ import annotations

import json
import re
from array import array
from itertools import accumulate
from typing import Any

MAX_DEPTH = 128

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # as signed bytes: +1, +1, -1, -1
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[{]}")


class JsonTooDeep(ValueError):
    """The JSON nests deeper than the limit (a ValueError, as ``json.JSONDecodeError`` is)."""

    def __init__(self, max_depth: int) -> None:
        super().__init__(f"JSON nested deeper than {max_depth} levels")
        self.max_depth = max_depth


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that raises :class:`JsonTooDeep` for nesting past ``max_depth`` (the
    outermost array or object is level 1); other bad JSON raises ``json.JSONDecodeError``."""
    try:
        value = json.loads(text)
    except RecursionError:  # nested past the interpreter's limit, hence past ours
        raise JsonTooDeep(max_depth) from None
    # Each level opens a bracket: counting them (in C) spares the scan for nearly every request.
    if _brackets(text) > max_depth and depth(_utf8(text)) > max_depth:
        raise JsonTooDeep(max_depth)
    return value


def depth(raw: bytes) -> int:
    """How deeply valid UTF-8 JSON nests, from its text: strings dropped, then the running
    count of brackets (C-speed steps, no recursion, several times faster than walking the
    decoded value)."""
    brackets = _STRING.sub(b"", raw).translate(_SIGNS, _NOT_BRACKETS)
    return max(accumulate(array("b", brackets)), default=0)


def _brackets(text: str | bytes) -> int:
    if isinstance(text, str):
        return text.count("[") + text.count("{")
    return text.count(b"[") + text.count(b"{")


def _utf8(text: str | bytes) -> bytes:
    if isinstance(text, str):
        return text.encode("utf-8", "surrogatepass")
    encoding = json.detect_encoding(text)
    if encoding == "utf-8":
        return text
    return text.decode(encoding).encode("utf-8", "surrogatepass")
