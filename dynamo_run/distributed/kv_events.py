"""KV cache events over NATS: a worker publishes what its engine stores and evicts; a
frontend replays them into its KV index.

Events go to ``dyn.kv.<ns>.<component>.<endpoint>.<instance>``, captured by the JetStream
stream ``dynamo_kv_events``, so a frontend started later (or restarted) rebuilds the index
by replaying the stream from its start. The engine's sink may be called from any thread (the
llama.cpp scheduler runs on its own): events are handed to the event loop in order and
published by one task, so their order on the wire is the order the engine produced them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from dynamo_run.distributed.failure_log import FailureLog
from dynamo_run.protocol.internal import KvCacheEvent

log = logging.getLogger("dynamo_run.kv_events")

KV_STREAM = "dynamo_kv_events"
KV_SUBJECT_PREFIX = "dyn.kv"
# Long enough for any frontend to catch up; old events of long-gone workers are dropped.
KV_STREAM_MAX_AGE_S = 3600.0

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(KvCacheEvent).decode


def kv_subject(namespace: str, component: str, endpoint: str, instance_id: str) -> str:
    return f"{KV_SUBJECT_PREFIX}.{namespace}.{component}.{endpoint}.{instance_id}"


async def ensure_kv_stream(nc: NATS) -> None:
    """The stream that keeps KV events for replay (created once; racing creators agree)."""
    js = nc.jetstream()
    try:
        await js.stream_info(KV_STREAM)
    except NotFoundError:
        with contextlib.suppress(Exception):  # another process created it meanwhile
            await js.add_stream(
                name=KV_STREAM,
                subjects=[f"{KV_SUBJECT_PREFIX}.>"],
                storage=js_api.StorageType.MEMORY,
                max_age=KV_STREAM_MAX_AGE_S,
                description="dynamo-run KV cache events, for routers",
            )


class KvEventPublisher:
    """The engine's KV event sink on a worker."""

    def __init__(self, nc: NATS, subject: str) -> None:
        self.nc = nc
        self.subject = subject
        self.published = 0
        # A lost event leaves routers with a wrong picture of this cache: show it.
        self.failures = FailureLog(log, f"KV event publishing on {subject}")
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[KvCacheEvent | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._publish_forever(), name="kv-events")

    def __call__(self, event: KvCacheEvent) -> None:
        """Thread-safe: called by the engine wherever its cache changes."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def _publish_forever(self) -> None:
        while True:
            event = await self._queue.get()
            if event is None:
                return
            try:
                await self.nc.publish(self.subject, _encode(event))
                self.published += 1
                self.failures.succeeded()
            except Exception as exc:  # NATS away: the router falls back on load
                self.failures.failed(exc)

    async def close(self) -> None:
        # Through the loop like the events, so that those already handed over go first.
        self._loop.call_soon_threadsafe(self._queue.put_nowait, None)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 5)


class KvEventSubscriber:
    """Replays the stream (from its start) and follows it, calling ``on_event`` with the
    instance id and the event; restarted after a reconnect to a new server."""

    def __init__(
        self,
        nc: NATS,
        prefix: str | None,
        on_event: Callable[[str, KvCacheEvent], None],
    ) -> None:
        self.nc = nc
        self.subject = f"{KV_SUBJECT_PREFIX}.{prefix}.*" if prefix else f"{KV_SUBJECT_PREFIX}.>"
        self.on_event = on_event
        self.received = 0
        self._sub = None

    async def start(self) -> None:
        await ensure_kv_stream(self.nc)
        js = self.nc.jetstream()
        self._sub = await js.subscribe(
            self.subject,
            stream=KV_STREAM,
            cb=self._on_message,
            ordered_consumer=True,
            deliver_policy=js_api.DeliverPolicy.ALL,
        )

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def _on_message(self, msg) -> None:
        instance_id = msg.subject.rsplit(".", 1)[1]
        try:
            event = _decode(msg.data)
        except Exception as exc:
            log.warning("ignoring a malformed KV event on %s: %s", msg.subject, exc)
            return
        self.received += 1
        log.debug(
            "KV event from %s: %s of %d blocks", instance_id, event.kind, len(event.block_hashes)
        )
        self.on_event(instance_id, event)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
