"""TensorRT-LLM's streamed ``RequestOutput`` as our EngineOutput deltas.

Each streamed step updates one ``RequestOutput`` in place: ``outputs[0].token_ids`` holds
*all* tokens so far (and ``logprobs`` one entry per token: a ``{token_id: Logprob}`` dict of
the top alternatives plus the chosen token, or a bare float), so deltas are the part past
what we passed on. On the last step a stop token may be trimmed from ``token_ids``.
``finish_reason`` is ``stop`` / ``length`` / ``timeout`` / ``cancelled``; with
``return_perf_metrics`` the request's ``kv_cache_metrics.num_reused_blocks`` tells how much
of the prompt came from the cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dynamo_run.protocol.internal import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineOutput,
    TokenLogprob,
)

_REASONS = {"stop": FINISH_STOP, "length": FINISH_LENGTH, "cancelled": FINISH_CANCELLED}


def finish_reason(raw: str | None, finished: bool) -> tuple[str | None, str | None]:
    """(our finish reason, error message) for a completion's ``finish_reason``."""
    if raw in _REASONS:
        return _REASONS[raw], None
    if raw == "timeout":
        return FINISH_ERROR, "trtllm: the request timed out"
    if raw is not None:
        return FINISH_ERROR, f"trtllm: request ended: {raw}"
    return (FINISH_STOP, None) if finished else (None, None)


def _value(logprob: Any) -> float:
    return float(getattr(logprob, "logprob", logprob))


def token_logprob(token_id: int, entry: Any, top_n: int) -> TokenLogprob:
    """Our logprob record from one position of ``CompletionOutput.logprobs``."""
    if not isinstance(entry, Mapping):
        return TokenLogprob(token_id, float(entry))
    chosen = _value(entry[token_id]) if token_id in entry else float("nan")
    ranked = sorted(entry.items(), key=lambda kv: -_value(kv[1]))
    return TokenLogprob(token_id, chosen, [(int(t), _value(lp)) for t, lp in ranked[:top_n]])


def cached_tokens(completion: Any, prompt_len: int, block_size: int) -> int | None:
    """Prompt tokens served from the KV cache, where the perf metrics report them."""
    metrics = getattr(completion, "request_perf_metrics", None)
    kv = getattr(metrics, "kv_cache_metrics", None)
    reused = getattr(kv, "num_reused_blocks", None)
    if reused is None:
        return None
    return min(prompt_len, int(reused) * block_size)


class OutputStream:
    """Turns one request's steps into deltas."""

    def __init__(self, prompt_len: int, block_size: int, logprobs: int | None = None) -> None:
        self.prompt_len = prompt_len
        self.block_size = block_size
        self.logprobs = logprobs
        self.seen = 0
        self.cached_reported = False

    def step(self, result: Any) -> EngineOutput:
        completion = result.outputs[0]
        ids = list(completion.token_ids or [])
        new = [int(t) for t in ids[self.seen :]]
        out = EngineOutput(token_ids=new)
        if self.logprobs is not None and new:
            entries = list(completion.logprobs or [])[self.seen : self.seen + len(new)]
            out.logprobs = [
                token_logprob(t, e, self.logprobs) for t, e in zip(new, entries, strict=False)
            ]
        if not self.cached_reported:
            cached = cached_tokens(completion, self.prompt_len, self.block_size)
            if cached is not None:
                out.cached_tokens = cached
                self.cached_reported = True
        finished = bool(getattr(result, "finished", False))
        out.finish_reason, out.error = finish_reason(completion.finish_reason, finished)
        self.seen += len(new)
        return out
