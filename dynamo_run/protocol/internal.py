"""Token-level request and output types exchanged between the frontend and engines.

They are msgspec structs so that the same objects travel unchanged to a worker on another
host (msgpack over NATS) as they do to an in-process engine.
"""

from __future__ import annotations

import msgspec


class SamplingOptions(msgspec.Struct, omit_defaults=True):
    """How to pick the next token. ``None`` means the engine's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    # Guided decoding. json_object: the output is some JSON object. json_schema: the output
    # is JSON matching this schema (response_format json_schema, or a forced tool call's
    # arguments); it wins over json_object. Engines that can enforce these say so with the
    # class attributes ``supports_json_object`` / ``supports_json_schema``.
    json_object: bool = False
    json_schema: dict | None = None


class StopConditions(msgspec.Struct, omit_defaults=True):
    """When the engine must stop. Stop *strings* are handled by the postprocessor."""

    max_tokens: int | None = None
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0


class PreprocessedRequest(msgspec.Struct, omit_defaults=True):
    """A request reduced to what any engine needs: token ids, sampling and stop rules."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingOptions = msgspec.field(default_factory=SamplingOptions)
    stop: StopConditions = msgspec.field(default_factory=StopConditions)
    # Number of most likely alternatives to report per generated token (None: no logprobs).
    logprobs: int | None = None
    model: str = ""


class TokenLogprob(msgspec.Struct):
    """Log-probability of one generated token and its best alternatives (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = msgspec.field(default_factory=list)


# Finish reasons an engine may report. The postprocessor maps them to the OpenAI API's.
FINISH_STOP = "stop"  # an end-of-sequence / stop token was produced
FINISH_LENGTH = "length"  # max_tokens or the context was reached
FINISH_CANCELLED = "cancelled"  # the consumer went away
FINISH_ERROR = "error"  # the engine failed; ``error`` says why


class EngineOutput(msgspec.Struct, omit_defaults=True):
    """One streamed step of an engine: new token ids, and a finish reason on the last one."""

    token_ids: list[int] = msgspec.field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    # Prompt tokens whose KV the engine found cached (prefix reuse); reported once.
    cached_tokens: int | None = None
    error: str | None = None
    # The worker instance that produced these tokens (remote engines; set when it changes).
    worker_id: str | None = None


# KV cache events an engine reports through its event sink (see dynamo_run.engine), so that a
# KV-aware router can tell which worker holds which prefix. Block hashes are chained (see
# dynamo_run.kv_blocks): equal prefixes give equal hashes on every worker.
KV_STORED = "stored"  # blocks now hold these prefixes (parent_hash: the block before them)
KV_REMOVED = "removed"  # these blocks were evicted or reused
KV_CLEARED = "cleared"  # everything the engine held is gone


class KvCacheEvent(msgspec.Struct, omit_defaults=True):
    """One change to an engine's KV cache, in whole blocks."""

    kind: str
    block_hashes: list[int] = msgspec.field(default_factory=list)
    parent_hash: int | None = None
    block_size: int = 16


class EngineLoad(msgspec.Struct, omit_defaults=True):
    """A worker's live load, published in discovery and used by routers."""

    in_flight: int = 0
    slots_total: int = 0
    slots_busy: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
