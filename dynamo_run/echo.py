"""The ``echo`` engine: streams the prompt's own tokens back at a steady pace.

It is token-level like every engine, so it exercises the whole pipeline (template,
tokeniser, detokeniser, stop rules, cancellation) without model weights, and gives tests
exact, predictable outputs. The pace comes from ``delay_ms`` in --extra-engine-args or the
``DYN_TOKEN_ECHO_DELAY_MS`` variable (Dynamo's name); default 10 ms per token.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator

from dynamo_run.engine import Engine, EngineCapabilities, EngineConfig
from dynamo_run.model.card import ModelCard
from dynamo_run.protocol.internal import (
    FINISH_LENGTH,
    FINISH_STOP,
    EngineLoad,
    EngineOutput,
    PreprocessedRequest,
)

DEFAULT_DELAY_MS = 10.0


class EchoEngine(Engine):
    """Echoes prompt tokens; ``in_flight`` counts requests still generating. It can do
    nothing beyond that (no embeddings, guided decoding or KV events)."""

    def __init__(self, delay_ms: float = DEFAULT_DELAY_MS) -> None:
        self.delay = max(0.0, delay_ms) / 1000.0
        self.in_flight = 0

    def capabilities(self) -> EngineCapabilities:
        return EngineCapabilities()

    def load(self) -> EngineLoad:
        return EngineLoad(in_flight=self.in_flight)

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        limit = request.stop.max_tokens
        tokens = request.token_ids if limit is None else request.token_ids[:limit]
        self.in_flight += 1
        try:
            for i, token in enumerate(tokens):
                if self.delay:
                    await asyncio.sleep(self.delay)
                last = i == len(tokens) - 1
                if not last:
                    yield EngineOutput(token_ids=[token])
                    continue
                truncated = limit is not None and limit < len(request.token_ids)
                yield EngineOutput([token], FINISH_LENGTH if truncated else FINISH_STOP)
                return
            yield EngineOutput(finish_reason=FINISH_LENGTH if limit == 0 else FINISH_STOP)
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        return None


def create_engine(card: ModelCard, config: EngineConfig) -> EchoEngine:
    """Entry point for ``out=echo``."""
    delay = config.extra.get("delay_ms", os.environ.get("DYN_TOKEN_ECHO_DELAY_MS"))
    return EchoEngine(float(delay) if delay is not None else DEFAULT_DELAY_MS)
