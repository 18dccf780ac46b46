"""Split think-tag reasoning (``<think>...</think>``) from the answer, streamed or not.

Whitespace around the reasoning and at the start of the answer after ``</think>`` is only
layout, so it is trimmed; an empty think block yields no reasoning at all.
"""

from __future__ import annotations

from ._base import partial_marker

OPEN = "<think>"
CLOSE = "</think>"


class ReasoningParser:
    """One per answer: feed decoded text, get (reasoning delta, content delta)."""

    def __init__(self, starts_in_reasoning: bool) -> None:
        # deepseek_r1: the prompt already opened <think>; qwen3: only an explicit <think> does.
        self._implicit = starts_in_reasoning
        self._state = "start"  # "start" | "reasoning" | "after" | "content"
        self._buf = ""
        self._started = False  # reasoning text emitted yet (leading whitespace is dropped)
        self._finished = False

    def feed(self, text: str) -> tuple[str, str]:
        """Add decoded text; return the reasoning and content safe to show now."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """End of generation: an unclosed think block is all reasoning."""
        if self._finished:
            return "", ""
        out = self._drain(final=True)
        self._finished = True
        return out

    def _drain(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self._state == "start":
                s = self._buf.lstrip()
                if s.startswith(OPEN):
                    self._buf = s[len(OPEN) :]
                    self._state = "reasoning"
                elif (not s or OPEN.startswith(s)) and not final:
                    break
                else:
                    self._state = "reasoning" if self._implicit else "content"
            elif self._state == "reasoning":
                if not self._started:
                    self._buf = self._buf.lstrip()
                i = self._buf.find(CLOSE)
                if i >= 0:
                    reasoning.append(self._buf[:i].rstrip())
                    self._buf = self._buf[i + len(CLOSE) :]
                    self._state = "after"
                    continue
                hold = 0 if final else partial_marker(self._buf, CLOSE)
                ready = self._buf[: len(self._buf) - hold]
                # Trailing whitespace waits: it is dropped if </think> follows it.
                n = len(ready.rstrip())
                if n:
                    reasoning.append(self._buf[:n])
                    self._buf = self._buf[n:]
                    self._started = True
                if final:
                    self._buf = ""
                break
            elif self._state == "after":
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._state = "content"
            else:
                content.append(self._buf)
                self._buf = ""
                break
        return "".join(reasoning), "".join(content)


_PARSERS = {"deepseek_r1": True, "qwen3": False}
REASONING_PARSERS: tuple[str, ...] = tuple(_PARSERS)


def reasoning_parser(name: str) -> ReasoningParser:
    """A fresh parser for one answer."""
    try:
        implicit = _PARSERS[name]
    except KeyError:
        known = ", ".join(REASONING_PARSERS)
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of: {known}") from None
    return ReasoningParser(implicit)


def detect_reasoning_parser(chat_template: str | None) -> str | None:
    """The think-tag parser a chat template implies, or None when it has no think tags.

    A template with an ``enable_thinking`` switch (Qwen3 hybrid) lets the model open
    ``<think>`` itself or not at all: qwen3. Any other think-tag template (DeepSeek-R1, QwQ,
    thinking-only Qwen3) may open the block in the prompt: deepseek_r1, which also accepts
    an opening tag in the output.
    """
    if not chat_template or CLOSE not in chat_template:
        return None
    return "qwen3" if "enable_thinking" in chat_template else "deepseek_r1"


def split_reasoning(name: str, text: str) -> tuple[str | None, str]:
    """Non-streaming split of a whole answer: (reasoning, or None when there is none; content)."""
    parser = reasoning_parser(name)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return (r1 + r2) or None, c1 + c2
