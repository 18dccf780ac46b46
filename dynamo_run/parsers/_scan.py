"""Find where a bracketed value ends in text that is still arriving.

Parsers only hand a call to ``json.loads``/``ast.parse`` once its brackets balance, so a
half-generated call is never mistaken for a malformed one. The scanner resumes where it
stopped, keeping one-character-at-a-time streaming linear.
"""

from __future__ import annotations

OPENERS = "[{("
CLOSERS = "]})"


class BracketScanner:
    """Track bracket depth outside string literals, from an opening bracket onwards."""

    def __init__(self, start: int, quotes: str = '"', triple: bool = False) -> None:
        self._i = start
        self._depth = 0
        self._quote = ""  # the open string's delimiter ('"', "'", '"""' or "'''"), or ""
        self._escape = False
        self._quotes = quotes
        self._triple = triple

    def advance(self, text: str) -> int | None:
        """Index just past the bracket closing the value, or None while it is still open."""
        i, n = self._i, len(text)
        while i < n:
            ch = text[i]
            if self._quote:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == self._quote[0]:
                    if len(self._quote) == 3:
                        if i + 3 > n:
                            break  # a closing triple quote may still be arriving
                        if not text.startswith(self._quote, i):
                            i += 1
                            continue
                        i += 2
                    self._quote = ""
            elif ch in self._quotes:
                if self._triple and i + 3 > n:
                    break  # may be a triple quote: wait for the next characters
                if self._triple and text.startswith(ch * 3, i):
                    self._quote = ch * 3
                    i += 2
                else:
                    self._quote = ch
            elif ch in OPENERS:
                self._depth += 1
            elif ch in CLOSERS:
                self._depth -= 1
                if self._depth <= 0:
                    self._i = i + 1
                    return i + 1
            i += 1
        self._i = i
        return None


def first_inside(text: str, start: int) -> str | None:
    """The first non-space character after the opening bracket at ``start``, None if none yet.

    It is enough to reject most prose that merely starts with a bracket (``[1] see``,
    ``{ is a brace``) at once, instead of holding the whole answer until it ends.
    """
    for ch in text[start + 1 :]:
        if not ch.isspace():
            return ch
    return None


def json_first_ok(opener: str, ch: str) -> bool:
    """Whether ``ch`` may open the inside of a call object (a key) or call list (an object)."""
    return ch == ('"' if opener == "{" else "{")
