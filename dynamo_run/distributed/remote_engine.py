"""The remote side as one more Engine: a frontend's pipeline streams a model's requests from
worker instances exactly as it would from an in-process engine.

Faults: an instance that fails before sending any token is replaced by another at once; one
that dies mid-stream is replaced up to ``--migration-limit`` times by sending the prompt plus
the tokens already streamed to another instance, so the client sees one unbroken stream.

Busy workers: an instance with as many of this frontend's requests as it has decode slots
(``--max-inflight-per-worker``), or over ``--active-decode-blocks-threshold``, takes no new
request; when every instance is busy, requests wait here, first come first served, for one
to free a slot. Waiting here rather than in the worker's engine keeps the next free slot for
whichever worker frees it, and a client that hangs up leaves this queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, Callable

import msgspec

from dynamo_run.distributed.kv_router import KvRouter
from dynamo_run.distributed.request_plane import RequestPlaneClient, WorkerFailed, WorkerLost
from dynamo_run.distributed.router import Router
from dynamo_run.distributed.wire import InstanceRecord, Work
from dynamo_run.engine import Capacity, Engine, EngineCapabilities
from dynamo_run.pipeline.admission import AdmissionSettings
from dynamo_run.pipeline.client import EngineUnavailable
from dynamo_run.protocol.internal import (
    FINISH_ERROR,
    FINISH_LENGTH,
    EngineLoad,
    EngineOutput,
    PreprocessedRequest,
)

log = logging.getLogger("dynamo_run.remote")

# A waiting request looks again this often even if no slot was freed (a worker came, or its
# reported KV use fell below the threshold).
RECHECK_S = 0.25


class InstanceStats:
    """Per-instance counters for metrics (the frontend's view)."""

    def on_request(self, instance: InstanceRecord) -> None: ...
    def on_route(self, instance: InstanceRecord, overlap_blocks: int, predicted: int) -> None: ...
    def on_cached(self, instance: InstanceRecord, cached_tokens: int) -> None: ...
    def on_error(self, instance: InstanceRecord) -> None: ...
    def on_migration(self, model: str) -> None: ...


class RemoteEngine(Engine):
    """Streams one model's requests from the instances ``instances()`` returns."""

    def __init__(
        self,
        model: str,
        instances: Callable[[], list[InstanceRecord]],
        plane: RequestPlaneClient,
        router: Router | KvRouter,
        migration_limit: int = 0,
        namespace_hint: str = "",
        stats: InstanceStats | None = None,
        admission: AdmissionSettings | None = None,
    ) -> None:
        self.model = model
        self.instances = instances
        self.plane = plane
        self.router = router
        self.migration_limit = migration_limit
        self.namespace_hint = namespace_hint
        self.stats = stats or InstanceStats()
        self.admission = admission or AdmissionSettings()
        self.in_flight = 0
        self._waiters: deque[asyncio.Event] = deque()  # requests waiting for a free slot

    # --- busy workers -------------------------------------------------------------------
    def _limit(self, record: InstanceRecord) -> int:
        return self.admission.limit_of(record.load.slots_total)

    def _busy(self, record: InstanceRecord) -> bool:
        limit = self._limit(record)
        if limit and self.router.in_flight[record.instance_id] >= limit:
            return True
        load = record.load
        return self.admission.blocks_busy(load.kv_blocks_used, load.kv_blocks_total)

    def capacity(self) -> Capacity | None:
        """What the live instances take at once (None: unknown, so no limit)."""
        live = self.instances()
        limits = [self._limit(r) for r in live]
        if not live or not all(limits):
            return None
        settings = self.admission
        now = sum(
            limit
            for r, limit in zip(live, limits, strict=True)
            if not settings.blocks_busy(r.load.kv_blocks_used, r.load.kv_blocks_total)
        )
        return Capacity(now, sum(limits))

    @property
    def waiting(self) -> int:
        """Requests waiting here for a worker with a free slot."""
        return len(self._waiters)

    def _has_room(self) -> bool:
        live = self.instances()
        return not live or any(not self._busy(r) for r in live)

    def _wake_next(self) -> None:
        if self._waiters:
            self._waiters[0].set()

    async def _wait_for_room(self) -> None:
        """Until an instance is not busy, behind the requests that came first."""
        if not self._waiters and self._has_room():
            return
        turn = asyncio.Event()
        self._waiters.append(turn)
        try:
            while True:
                timeout = None  # behind others: woken when the one ahead leaves
                if self._waiters[0] is turn:
                    if self._has_room():
                        return
                    timeout = RECHECK_S
                turn.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(turn.wait(), timeout)
        finally:
            self._waiters.remove(turn)  # also when the client hung up while waiting
            self._wake_next()  # the next one looks (there may be room for it too)

    def capabilities(self) -> EngineCapabilities:
        """What the workers registered (their InstanceRecord). Guided decoding only when
        every live instance can enforce it, since any may be picked. Outputs name their
        worker (x-dynamo-worker). Embeddings are not on the request plane, and KV events
        go from the workers to the router directly."""
        live = self.instances()
        return EngineCapabilities(
            json_object=bool(live) and all(r.supports_json_object for r in live),
            json_schema=bool(live) and all(r.supports_json_schema for r in live),
            remote=True,
        )

    def load(self) -> EngineLoad:
        live = self.instances()
        return EngineLoad(
            in_flight=self.in_flight,
            slots_total=sum(r.load.slots_total for r in live),
            slots_busy=sum(r.load.slots_busy for r in live),
        )

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        prompt = list(request.token_ids)
        generated: list[int] = []
        tried: set[str] = set()
        migrations = 0
        cached_reported = False
        self.in_flight += 1
        try:
            await self._wait_for_room()
            while True:
                attempt_ids = prompt + generated
                live = self.instances()
                free = [r for r in live if not self._busy(r)]
                choice = self.router.choose(self.model, free or live, attempt_ids, tried)
                if choice is None and free:  # every free one failed it: any other then
                    choice = self.router.choose(self.model, live, attempt_ids, tried)
                instance = None if choice is None else choice[0]
                if choice is None or instance is None:
                    where = f" in {self.namespace_hint}" if self.namespace_hint else ""
                    message = f"no live instance serves model `{self.model}`{where}"
                    if not generated:
                        raise EngineUnavailable(message)
                    yield EngineOutput(finish_reason=FINISH_ERROR, error=message)
                    return
                tried.add(instance.instance_id)
                attempt = _continuation(request, prompt, generated)
                if attempt is None:  # the budget was used up exactly when the worker died
                    yield EngineOutput(finish_reason=FINISH_LENGTH)
                    return
                self.stats.on_request(instance)
                block_size = self.router.block_size if isinstance(self.router, KvRouter) else 0
                self.stats.on_route(instance, choice[1], choice[1] * block_size)
                active: list = []
                if isinstance(self.router, KvRouter):
                    active = self.router.request_keys(attempt_ids)
                    self.router.add_active(instance.instance_id, active)
                self.router.in_flight[instance.instance_id] += 1
                stream = self.plane.stream(instance.subject, instance.instance_id, Work(attempt))
                named = False
                try:
                    async for output in stream:
                        if not named:  # the first output of each instance says who serves
                            output = msgspec.structs.replace(output, worker_id=instance.instance_id)
                            named = True
                        if output.cached_tokens is not None:
                            self.stats.on_cached(instance, output.cached_tokens)
                            if cached_reported:
                                output = msgspec.structs.replace(output, cached_tokens=None)
                            cached_reported = True
                        generated.extend(output.token_ids)
                        yield output
                    return
                except (WorkerLost, WorkerFailed) as exc:
                    self.stats.on_error(instance)
                    if not generated:
                        log.warning("%s; trying another instance", exc)
                        continue
                    if isinstance(exc, WorkerLost) and migrations < self.migration_limit:
                        migrations += 1
                        self.stats.on_migration(self.model)
                        log.warning(
                            "%s after %d tokens; migrating (%d of %d)",
                            exc, len(generated), migrations, self.migration_limit,
                        )  # fmt: skip
                        continue
                    yield EngineOutput(finish_reason=FINISH_ERROR, error=str(exc))
                    return
                finally:
                    await stream.aclose()  # a consumer that left cancels the worker's request now
                    self.router.in_flight[instance.instance_id] -= 1
                    if active:
                        self.router.remove_active(instance.instance_id, active)
                    self._wake_next()
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        return None


def _continuation(
    request: PreprocessedRequest, prompt: list[int], generated: list[int]
) -> PreprocessedRequest | None:
    """The request to send next: the original, or the prompt plus what was already streamed
    with the token budget reduced by as much (None when nothing is left to generate)."""
    if not generated:
        return request
    stop = request.stop
    budget = None if stop.max_tokens is None else stop.max_tokens - len(generated)
    if budget is not None and budget <= 0:
        return None
    stop = msgspec.structs.replace(
        stop, max_tokens=budget, min_tokens=max(0, stop.min_tokens - len(generated))
    )
    return msgspec.structs.replace(
        request,
        request_id=f"{request.request_id}-m{len(generated)}",
        token_ids=prompt + generated,
        stop=stop,
    )
