"""Deltas -> streamed OpenAI SSE chunks (whole responses: ``dynamo_run.pipeline.responses``).

Streamed chunks are the per-token path, so they are built from string templates fixed once
per request plus one C-level JSON string escape per token (about 20x cheaper than dumping a
dict, and 100x cheaper than a pydantic model). The shapes are the pydantic models in
``dynamo_run.protocol.openai`` (``ChatCompletionChunk``, ``CompletionResponse``); the tests
validate streamed chunks against strict copies of them (``tests/strict_models.py``:
any key they do not define fails).
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii as _q  # type: ignore[attr-defined]
from typing import Any

from dynamo_run.pipeline.client import Delta
from dynamo_run.pipeline.responses import TokenTexts
from dynamo_run.protocol.internal import TokenLogprob

DONE = b"data: [DONE]\n\n"


def dumps(value: object) -> str:
    """Compact JSON, UTF-8 rather than escapes, for every body the server writes."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _fr(finish_reason: str | None) -> str:
    return "null" if finish_reason is None else _q(finish_reason)


class _Chunks:
    """The events of one streamed request: fixed JSON head and tail, per-token middle.

    ``texts``/``top_n`` are set when the request asked for logprobs."""

    OBJECT: str  # the chunks' "object" field

    def __init__(
        self,
        request_id: str,
        created: int,
        model: str,
        include_usage: bool,
        texts: TokenTexts | None = None,
        top_n: int = 0,
    ) -> None:
        self._head = (
            f'data: {{"id":{_q(request_id)},"object":"{self.OBJECT}","created":{created},'
            f'"model":{_q(model)},"system_fingerprint":null,"choices":'
        )
        self._tail = ',"usage":null}\n\n' if include_usage else "}\n\n"
        self.include_usage = include_usage
        self.texts = texts
        self.top_n = top_n

    def opening(self, count: int) -> list[bytes]:
        """Events sent before the first token, for ``count`` choices."""
        return []

    def content(
        self, index: int, text: str, finish_reason: str | None, logprobs: str = "null"
    ) -> bytes:
        raise NotImplementedError

    def logprobs(self, index: int, items: list[TokenLogprob]) -> str:
        raise NotImplementedError

    def usage(self, usage: dict[str, object]) -> bytes:
        return f'{self._head}[],"usage":{dumps(usage)}}}\n\n'.encode()


class ChatChunks(_Chunks):
    """``data: {chat.completion.chunk}`` events."""

    OBJECT = "chat.completion.chunk"

    def opening(self, count: int) -> list[bytes]:
        """Each choice starts with the assistant role and no text (OpenAI's order)."""
        return [
            f'{self._head}[{{"index":{index},"delta":{{"role":"assistant","content":""}},'
            f'"logprobs":null,"finish_reason":null}}]{self._tail}'.encode()
            for index in range(count)
        ]

    def content(
        self, index: int, text: str, finish_reason: str | None, logprobs: str = "null"
    ) -> bytes:
        delta = '{"content":' + _q(text) + "}" if text or finish_reason is None else "{}"
        return (
            f'{self._head}[{{"index":{index},"delta":{delta},"logprobs":{logprobs},'
            f'"finish_reason":{_fr(finish_reason)}}}]{self._tail}'
        ).encode()

    def logprobs(self, index: int, items: list[TokenLogprob]) -> str:
        assert self.texts is not None
        return dumps({"content": self.texts.chat_logprobs(items, self.top_n)})

    def parsed(self, index: int, delta: Delta, logprobs: str = "null") -> list[bytes]:
        """The events of a delta the answer parsers split: reasoning, content, then each
        tool call as OpenAI streams it (id, type and name with empty arguments first, then
        the arguments), the finish reason and logprobs on the last event."""
        deltas: list[dict[str, Any]] = []
        if delta.reasoning:
            deltas.append({"reasoning_content": delta.reasoning})
        if delta.text:
            deltas.append({"content": delta.text})
        for call in delta.tool_calls or ():
            if call.id is not None or call.name is not None:
                head: dict[str, Any] = {"index": call.index, "type": "function"}
                if call.id is not None:
                    head["id"] = call.id
                head["function"] = {"name": call.name or "", "arguments": ""}
                deltas.append({"tool_calls": [head]})
            if call.arguments:
                part = {"index": call.index, "function": {"arguments": call.arguments}}
                deltas.append({"tool_calls": [part]})
        if not deltas:
            deltas.append({})
        events = []
        for i, body in enumerate(deltas):
            last = i == len(deltas) - 1
            events.append(
                (
                    f'{self._head}[{{"index":{index},"delta":{dumps(body)},'
                    f'"logprobs":{logprobs if last else "null"},'
                    f'"finish_reason":{_fr(delta.finish_reason if last else None)}}}]{self._tail}'
                ).encode()
            )
        return events


class CompletionChunks(_Chunks):
    """``data: {text_completion}`` events; ``echo_prompts`` are sent first (``echo``)."""

    OBJECT = "text_completion"

    def __init__(self, *args: Any, echo_prompts: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.echo_prompts = echo_prompts
        self._offsets: dict[int, int] = {}  # text offset of each choice, for logprobs

    def opening(self, count: int) -> list[bytes]:
        if not self.echo_prompts:
            return []
        for index, prompt in enumerate(self.echo_prompts):
            self._offsets[index] = len(prompt)
        return [self.content(i, p, None) for i, p in enumerate(self.echo_prompts)]

    def content(
        self, index: int, text: str, finish_reason: str | None, logprobs: str = "null"
    ) -> bytes:
        return (
            f'{self._head}[{{"index":{index},"text":{_q(text)},"logprobs":{logprobs},'
            f'"finish_reason":{_fr(finish_reason)}}}]{self._tail}'
        ).encode()

    def logprobs(self, index: int, items: list[TokenLogprob]) -> str:
        assert self.texts is not None
        block, self._offsets[index] = self.texts.completion_logprobs(
            items, self.top_n, self._offsets.get(index, 0)
        )
        return dumps(block)


def error_event(body: dict[str, object]) -> bytes:
    """An error reported inside a stream that has already started (status is 200 by then)."""
    return b"data: " + dumps(body).encode() + b"\n\n"
