"""Run the choices of one HTTP request and turn their deltas into SSE events or a whole
response. All choices run concurrently; closing the event stream (client hung up) closes
every engine generator of the request at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request

from dynamo_run.inputs.http_errors import ApiError, engine_error
from dynamo_run.inputs.http_middleware import CLIENT_CLOSED, RequestInfo
from dynamo_run.inputs.http_render import (
    DONE,
    ChatChunks,
    CompletionChunks,
    error_event,
    usage_dict,
)
from dynamo_run.metrics import FrontendMetrics, RequestTimer
from dynamo_run.pipeline.client import Delta, EngineFailure, ModelClient, copy_for_choice
from dynamo_run.pipeline.preprocess import PreparedRequest
from dynamo_run.protocol.internal import TokenLogprob

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

    def start_timer(self) -> RequestTimer:
        """Counts the request in flight until ``finish``; called inside the generators'
        try/finally so that a response that never starts leaks nothing."""
        tokens = sum(p.prompt_tokens for p in self.prompts)
        return self.metrics.timer(self.client.card.name, tokens, self.arrival)

    def choices(self) -> list[PreparedRequest]:
        return [copy_for_choice(p, j) for p in self.prompts for j in range(self.n)]

    def usage(self, results: dict[int, Delta]) -> dict[str, object]:
        """Usage over all choices: each prompt counted once, every choice's output."""
        prompt = sum(p.prompt_tokens for p in self.prompts)
        completion = sum(d.completion_tokens for d in results.values())
        cached = 0
        for k in range(len(self.prompts)):
            ours = [results[i] for i in range(k * self.n, (k + 1) * self.n) if i in results]
            cached += max((d.cached_tokens for d in ours), default=0)
        return usage_dict(prompt, completion, cached)


async def _one(client: ModelClient, prepared: PreparedRequest) -> AsyncIterator[tuple[int, Delta]]:
    async with contextlib.aclosing(client.stream(prepared)) as stream:
        async for delta in stream:
            yield 0, delta


async def _merged(
    client: ModelClient, choices: list[PreparedRequest]
) -> AsyncIterator[tuple[int, Delta]]:
    queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, prepared: PreparedRequest) -> None:
        try:
            async with contextlib.aclosing(client.stream(prepared)) as stream:
                async for delta in stream:
                    queue.put_nowait((index, delta))
        except Exception as exc:
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(choices)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def choice_deltas(gen: Generation) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) from every choice, in arrival order."""
    choices = gen.choices()
    if len(choices) == 1:
        return _one(gen.client, choices[0])
    return _merged(gen.client, choices)


async def sse_events(
    gen: Generation, chunks: ChatChunks | CompletionChunks
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed request, ending with ``data: [DONE]``. Errors after the
    response started become an error event; a client hang-up closes every choice."""
    last: dict[int, Delta] = {}
    timer = gen.start_timer()
    try:
        for event in chunks.opening(len(gen.prompts) * gen.n):
            yield event
        with_logprobs = chunks.texts is not None
        async with contextlib.aclosing(choice_deltas(gen)) as deltas:
            async for index, delta in deltas:
                timer.tokens(len(delta.token_ids))
                last[index] = delta
                if with_logprobs and delta.logprobs:
                    lp = chunks.logprobs(index, delta.logprobs)
                    yield chunks.content(index, delta.text, delta.finish_reason, lp)
                else:
                    yield chunks.content(index, delta.text, delta.finish_reason)
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


@dataclass
class ChoiceResult:
    """One whole choice of a non-streamed response."""

    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


async def collect(gen: Generation) -> tuple[list[ChoiceResult], dict[str, object]]:
    """Run every choice to the end: the choices in index order, and the usage."""
    count = len(gen.prompts) * gen.n
    parts: list[list[str]] = [[] for _ in range(count)]
    results = [ChoiceResult() for _ in range(count)]
    last: dict[int, Delta] = {}
    timer = gen.start_timer()
    try:
        async with contextlib.aclosing(choice_deltas(gen)) as deltas:
            async for index, delta in deltas:
                timer.tokens(len(delta.token_ids))
                last[index] = delta
                parts[index].append(delta.text)
                if delta.logprobs:
                    results[index].logprobs.extend(delta.logprobs)
                if delta.finish_reason is not None:
                    results[index].finish_reason = delta.finish_reason
    finally:
        timer.finish(sum(d.completion_tokens for d in last.values()))
    for result, texts in zip(results, parts, strict=True):
        result.text = "".join(texts)
    return results, gen.usage(last)


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
