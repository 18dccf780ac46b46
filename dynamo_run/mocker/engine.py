"""``out=mocker``: a simulated engine with a real scheduler's shape and no model weights.

It batches requests like a continuous-batching engine, keeps a KV block pool with prefix
reuse (reported as ``cached_tokens``), takes prefill and decode time from a simple cost
model, emits KV events like a real worker, and generates deterministic pseudo-words, so the
frontend, routers and distributed pieces can be tested and benchmarked on any machine.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from dynamo_run.engine import Engine, EngineCapabilities, KvEventSink
from dynamo_run.mocker.block_pool import BlockPool
from dynamo_run.mocker.config import MockerSettings
from dynamo_run.mocker.scheduler import Scheduler, Sequence
from dynamo_run.protocol.internal import (
    FINISH_LENGTH,
    EngineLoad,
    EngineOutput,
    PreprocessedRequest,
)


class MockerEngine(Engine):
    """The mocker. ``in_flight`` counts requests from their start (queued or running) until
    their generator ends; ``pool`` and ``scheduler`` are open for inspection. It reports
    KV events; it has no grammar, so no guided decoding."""

    def __init__(
        self, settings: MockerSettings, words: list[int], context_length: int | None = None
    ) -> None:
        self.settings = settings
        self.context_length = context_length
        self.pool = BlockPool(settings.num_gpu_blocks, settings.block_size)
        self.scheduler = Scheduler(settings, self.pool, words)
        self.in_flight = 0

    def capabilities(self) -> EngineCapabilities:
        return EngineCapabilities(kv_events=True, max_concurrency=self.settings.max_num_seqs)

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self.pool.sink = sink

    def load(self) -> EngineLoad:
        return EngineLoad(
            in_flight=self.in_flight,
            slots_total=self.settings.max_num_seqs,
            slots_busy=len(self.scheduler.running),
            kv_blocks_total=self.pool.num_blocks,
            kv_blocks_used=self.pool.used,
        )

    def _max_new(self, request: PreprocessedRequest) -> int:
        limit = request.stop.max_tokens
        room = None
        if self.context_length is not None:
            room = self.context_length - len(request.token_ids)
        if limit is None:
            # Nothing else ends a mocker answer: without max_tokens it fills the context.
            return room if room is not None else 0
        return limit if room is None else min(limit, room)

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        """One token per scheduler step until ``max_tokens`` (never EOS: ``stop_token_ids``,
        ``ignore_eos``, ``min_tokens`` and the sampling settings change nothing)."""
        self.in_flight += 1
        seq: Sequence | None = None
        try:
            max_new = self._max_new(request)
            if max_new <= 0:
                yield EngineOutput(finish_reason=FINISH_LENGTH)
                return
            seq = Sequence(
                request_id=request.request_id,
                tokens=list(request.token_ids),
                prompt_len=len(request.token_ids),
                max_new=max_new,
                block_size=self.settings.block_size,
                logprobs=request.logprobs,
            )
            self.scheduler.submit(seq)
            while True:
                out = await seq.outbox.get()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            if seq is not None:
                self.scheduler.abort(seq)
            self.in_flight -= 1

    async def close(self) -> None:
        """Stop the scheduler loop; the pool reports ``cleared``."""
        await self.scheduler.close()
