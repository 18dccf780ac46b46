"""SGLang's streamed output dicts as our EngineOutput deltas.

By default SGLang streams *cumulative* output: every chunk carries all ``output_ids`` so
far (and all logprobs so far in ``meta_info``); with ``incremental_streaming_output`` it
streams disjoint segments. Both become deltas here. ``meta_info`` also carries
``cached_tokens`` (prompt tokens served from the radix cache) and, on the last chunk,
``finish_reason``: ``{"type": "stop" | "length" | "abort", ...}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dynamo_run.protocol.internal import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineOutput,
    TokenLogprob,
)


def finish_reason(raw: Any, aborted: bool = False) -> tuple[str | None, str | None]:
    """(our finish reason, error message) for SGLang's ``meta_info["finish_reason"]``.
    An abort we asked for is ``cancelled``; any other abort (prompt too long, engine
    shutting down, ...) is an error carrying SGLang's message."""
    if raw is None:
        return None, None
    kind = raw.get("type") if isinstance(raw, dict) else str(raw)
    if kind == "stop":
        return FINISH_STOP, None
    if kind == "length":
        return FINISH_LENGTH, None
    if kind == "abort" and aborted:
        return FINISH_CANCELLED, None
    message = raw.get("message") if isinstance(raw, dict) else None
    return FINISH_ERROR, f"sglang: {message or f'request ended: {raw}'}"


def _logprob(entry: Sequence[Any]) -> tuple[int, float]:
    """SGLang's (logprob, token_id, text-or-None) as our (token_id, logprob)."""
    return int(entry[1]), float(entry[0])


class OutputStream:
    """Turns one request's chunks into deltas; ``incremental`` says which way SGLang
    streams (its ``incremental_streaming_output`` server argument)."""

    def __init__(self, incremental: bool = False, logprobs: bool = False) -> None:
        self.incremental = incremental
        self.want_logprobs = logprobs
        self.seen = 0  # generated tokens already passed on
        self.cached_reported = False
        self.aborted = False  # we aborted it (closing): SGLang's abort is `cancelled`

    def step(self, chunk: dict[str, Any]) -> EngineOutput:
        ids = chunk.get("output_ids") or []
        start = 0 if self.incremental else self.seen
        new = [int(t) for t in ids[start:]]
        meta = chunk.get("meta_info") or {}
        out = EngineOutput(token_ids=new)
        if self.want_logprobs and new:
            out.logprobs = self._logprobs(meta, start, len(new))
        cached = meta.get("cached_tokens")
        if cached is not None and not self.cached_reported:
            out.cached_tokens = int(cached)
            self.cached_reported = True
        reason, error = finish_reason(meta.get("finish_reason"), self.aborted)
        out.finish_reason = reason
        out.error = error
        self.seen += len(new)
        return out

    def _logprobs(self, meta: dict[str, Any], start: int, count: int) -> list[TokenLogprob]:
        tokens = list(meta.get("output_token_logprobs") or [])[start : start + count]
        tops = list(meta.get("output_top_logprobs") or [])[start : start + count]
        result = []
        for i, entry in enumerate(tokens):
            token_id, logprob = _logprob(entry)
            top = tops[i] if i < len(tops) and tops[i] else []
            result.append(TokenLogprob(token_id, logprob, [_logprob(t) for t in top]))
        return result
