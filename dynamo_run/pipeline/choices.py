"""Run the n choices of every prompt of one request concurrently, for every input.

Choice ``k * n + j`` is choice ``j`` of prompt ``k`` (the OpenAI API's order). Closing the
merged stream (client hung up, one choice failed) closes every choice's engine generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence

from dynamo_run.pipeline.answer import ToolCallJoin
from dynamo_run.pipeline.client import Completion, Delta, ModelClient, copy_for_choice
from dynamo_run.pipeline.preprocess import PreparedRequest


def expand_choices(prompts: Sequence[PreparedRequest], n: int) -> list[PreparedRequest]:
    """One request per choice, in the API's order."""
    return [copy_for_choice(p, j) for p in prompts for j in range(n)]


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


def choice_deltas(
    client: ModelClient, choices: list[PreparedRequest]
) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) from every choice, in arrival order; the first error raised
    by any choice ends them all."""
    if len(choices) == 1:
        return _one(client, choices[0])
    return _merged(client, choices)


async def complete_choices(
    client: ModelClient,
    choices: list[PreparedRequest],
    on_delta: Callable[[int, Delta], None] | None = None,
) -> list[Completion]:
    """Run every choice to the end: their whole answers in index order. ``on_delta`` sees
    each delta as it arrives (the HTTP server's token metrics)."""
    start = time.perf_counter()
    parts: list[list[str]] = [[] for _ in choices]
    done = [Completion("", None, p.prompt_tokens, 0) for p in choices]
    calls = [ToolCallJoin() for _ in choices]
    async with contextlib.aclosing(choice_deltas(client, choices)) as deltas:
        async for index, delta in deltas:
            if on_delta is not None:
                on_delta(index, delta)
            result = done[index]
            if delta.token_ids:
                result.token_ids.extend(delta.token_ids)
                if result.time_to_first_token is None:
                    result.time_to_first_token = time.perf_counter() - start
            parts[index].append(delta.text)
            result.add(delta, calls[index])
            if delta.worker_id is not None:
                result.worker_id = delta.worker_id
            if delta.logprobs:
                result.logprobs.extend(delta.logprobs)
            if delta.finish_reason is not None:
                result.finish_reason = delta.finish_reason
                result.elapsed = time.perf_counter() - start
            result.prompt_tokens = delta.prompt_tokens or result.prompt_tokens
            result.completion_tokens = delta.completion_tokens
            result.cached_tokens = delta.cached_tokens
    for result, texts in zip(done, parts, strict=True):
        result.text = "".join(texts)
    return done
