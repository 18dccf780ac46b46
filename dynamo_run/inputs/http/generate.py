"""Run the choices of one HTTP request and turn their deltas into SSE events, or collect
them for a whole response (built by ``dynamo_run.pipeline.responses``). All choices run
concurrently; closing the event stream (client hung up) closes every engine generator of
the request at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request

from dynamo_run.inputs.http.errors import ApiError, engine_error
from dynamo_run.inputs.http.middleware import CLIENT_CLOSED, RequestInfo
from dynamo_run.inputs.http.render import DONE, ChatChunks, CompletionChunks, error_event
from dynamo_run.metrics import FrontendMetrics, RequestTimer
from dynamo_run.pipeline.choices import choice_deltas, complete_choices, expand_choices
from dynamo_run.pipeline.client import Completion, Delta, EngineFailure, ModelClient
from dynamo_run.pipeline.preprocess import PreparedRequest
from dynamo_run.pipeline.responses import choices_usage

T = TypeVar("T")
log = logging.getLogger("dynamo_run.http")


@dataclass
class Generation:
    """One HTTP request's choices: ``prompts`` x ``n``; choice ``k * n + j`` is choice ``j``
    of prompt ``k`` (the OpenAI API's order)."""

    client: ModelClient
    prompts: list[PreparedRequest]
    n: int
    metrics: FrontendMetrics
    arrival: float  # perf_counter() when the request arrived, for TTFT
    info: RequestInfo
    logprobs: int | None = None  # alternatives per token; None: no logprobs
    # Remote engines: the stream opens with its first token, so that the response headers
    # can name the worker instance serving it (x-dynamo-worker).
    hold_opening: bool = False
    workers: list[str] = field(default_factory=list)

    def start_timer(self) -> RequestTimer:
        """Counts the request in flight until ``finish``; called inside the generators'
        try/finally so that a response that never starts leaks nothing."""
        tokens = sum(p.prompt_tokens for p in self.prompts)
        return self.metrics.timer(self.client.card.name, tokens, self.arrival)

    def choices(self) -> list[PreparedRequest]:
        return expand_choices(self.prompts, self.n)

    def usage(self, results: dict[int, Delta]) -> dict[str, object]:
        """Usage over the choices that have answered so far."""
        return choices_usage(self.prompts, self.n, results)


async def sse_events(
    gen: Generation, chunks: ChatChunks | CompletionChunks
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed request, ending with ``data: [DONE]``. Errors after the
    response started become an error event; a client hang-up closes every choice."""
    last: dict[int, Delta] = {}
    timer = gen.start_timer()
    try:
        opening = list(chunks.opening(len(gen.prompts) * gen.n))
        if not gen.hold_opening:
            for event in opening:
                yield event
            opening = []
        with_logprobs = chunks.texts is not None
        async with contextlib.aclosing(choice_deltas(gen.client, gen.choices())) as deltas:
            async for index, delta in deltas:
                if delta.worker_id and delta.worker_id not in gen.workers:
                    gen.workers.append(delta.worker_id)
                if opening:
                    for event in opening:
                        yield event
                    opening = []
                timer.tokens(len(delta.token_ids))
                last[index] = delta
                lp = "null"
                if with_logprobs and delta.logprobs:
                    lp = chunks.logprobs(index, delta.logprobs)
                if (delta.reasoning or delta.tool_calls) and isinstance(chunks, ChatChunks):
                    for event in chunks.parsed(index, delta, lp):
                        yield event
                else:
                    yield chunks.content(index, delta.text, delta.finish_reason, lp)
        if chunks.include_usage:
            yield chunks.usage(gen.usage(last))
        yield DONE
    except EngineFailure as exc:
        gen.info.status = 500
        log.error("engine failure in a stream: %s", exc)
        yield error_event(engine_error(exc).body())
        yield DONE
    except Exception as exc:  # a bug: tell the client, keep the traceback in the log
        gen.info.status = 500
        log.exception("stream failed: %s", exc)
        yield error_event(ApiError(500, "internal server error", code="internal_error").body())
        yield DONE
    except (asyncio.CancelledError, GeneratorExit):
        gen.info.status = CLIENT_CLOSED
        raise
    finally:
        timer.finish(sum(d.completion_tokens for d in last.values()))


async def collect(gen: Generation) -> list[Completion]:
    """Run every choice to the end: their whole answers in index order."""
    last: dict[int, Delta] = {}
    timer = gen.start_timer()

    def seen(index: int, delta: Delta) -> None:
        timer.tokens(len(delta.token_ids))
        last[index] = delta

    try:
        return await complete_choices(gen.client, gen.choices(), seen)
    finally:
        timer.finish(sum(d.completion_tokens for d in last.values()))


async def unless_disconnected(request: Request, work: Awaitable[T], info: RequestInfo) -> T | None:
    """Await ``work`` but cancel it if the client hangs up first (then return None)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        info.status = CLIENT_CLOSED
        return None
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
