"""Pythonic format: ``[get_weather(city="Paris"), get_time()]`` opening the answer.

Parsed with ``ast`` and ``ast.literal_eval`` only: model output is never evaluated.
"""

from __future__ import annotations

import ast

from ._base import ToolCall
from ._leading import LeadingParser


def _dotted(node: ast.expr) -> str | None:
    """``f`` or ``pkg.f`` as a name; None for anything else (calls, subscripts...)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def parse_pythonic(text: str) -> list[tuple[str, dict]] | None:
    """(name, keyword arguments) of each call in a list of literal-only calls, else None."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _dotted(node.func)
        if name is None:
            return None
        args = {}
        for kw in node.keywords:
            if kw.arg is None:
                return None
            try:
                args[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return None
        calls.append((name, args))
    return calls


class PythonicParser(LeadingParser):
    """A Python list of keyword-argument calls (Llama 3.2/4 pythonic tool calling)."""

    START_TAGS = ("<|python_start|>",)
    END_TAGS = ("<|python_end|>",)
    OPENERS = "["
    QUOTES = "\"'"
    TRIPLE = True

    def _first_ok(self, opener: str, ch: str) -> bool:
        return ch.isidentifier()  # a function name starts the list

    def _parse_value(self, text: str) -> list[ToolCall]:
        parsed = parse_pythonic(text)
        if parsed is None:
            return []
        calls = [self._make_call(name, args) for name, args in parsed]
        return calls if all(calls) else []
