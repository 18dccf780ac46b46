"""The request plane over NATS core subjects: a worker serving an engine, and the client a
frontend uses to stream one request from one instance.

Every reply for a frontend arrives on one wildcard inbox subscription and is routed to its
stream by subject, so a request costs two publishes and no subscription round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from itertools import count

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from dynamo_run.distributed.wire import (
    Ack,
    Cancel,
    End,
    Fail,
    Heartbeat,
    Out,
    Work,
    decode_to_frontend,
    decode_to_worker,
    encode,
)
from dynamo_run.engine import Engine
from dynamo_run.protocol.internal import EngineOutput

log = logging.getLogger("dynamo_run.request_plane")

HEARTBEAT_S = 1.0


# --- worker side --------------------------------------------------------------------------
@dataclass
class _Active:
    task: asyncio.Task[None]
    inbox: str
    last_sent: float = field(default_factory=time.monotonic)


class EndpointServer:
    """Serves one engine on one instance subject until ``drain``."""

    def __init__(self, nc: NATS, subject: str, engine: Engine, instance_id: str) -> None:
        self.nc = nc
        self.subject = subject
        self.engine = engine
        self.instance_id = instance_id
        self.active: dict[str, _Active] = {}
        self.served = 0
        self._sub = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._accepting = True

    @property
    def in_flight(self) -> int:
        return len(self.active)

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.subject, cb=self._on_message)
        self._heartbeat = asyncio.create_task(self._heartbeats(), name="worker-heartbeats")

    async def resubscribe(self) -> None:
        """nats-py restores subscriptions after a reconnect; this only covers a closed one."""
        if self._sub is None and self._accepting:
            self._sub = await self.nc.subscribe(self.subject, cb=self._on_message)

    async def _on_message(self, msg: Msg) -> None:
        try:
            message = decode_to_worker(msg.data)
        except Exception as exc:
            log.warning("dropping a malformed request on %s: %s", self.subject, exc)
            return
        if isinstance(message, Cancel):
            active = self.active.get(message.request_id)
            if active is not None:
                active.task.cancel()
            return
        if not msg.reply:
            return
        request_id = message.request.request_id
        if not self._accepting:
            refusal = Fail(f"instance {self.instance_id} is shutting down", retryable=True)
            await self._send(msg.reply, refusal)
            return
        task = asyncio.create_task(self._serve(message, msg.reply), name=f"serve-{request_id}")
        active = self.active[request_id] = _Active(task, msg.reply)
        # A Cancel that comes before the task first runs ends it without running its body.
        task.add_done_callback(lambda _: self._forget(request_id, active))

    def _forget(self, request_id: str, active: _Active) -> None:
        if self.active.get(request_id) is active:
            del self.active[request_id]

    async def _send(self, inbox: str, message: Ack | Out | Heartbeat | End | Fail) -> None:
        await self.nc.publish(inbox, encode(message))

    async def _serve(self, work: Work, inbox: str) -> None:
        request_id = work.request.request_id
        active = self.active.get(request_id)
        outputs = self.engine.generate(work.request)
        try:
            await self._send(inbox, Ack(self.instance_id))
            async for output in outputs:
                await self._send(inbox, Out(output))
                if active is not None:
                    active.last_sent = time.monotonic()
            await self._send(inbox, End())
        except asyncio.CancelledError:
            pass  # the frontend cancelled, or the worker is stopping: the engine is freed below
        except Exception as exc:
            log.exception("request %s failed", request_id)
            with contextlib.suppress(Exception):
                await self._send(inbox, Fail(f"{type(exc).__name__}: {exc}"))
        finally:
            with contextlib.suppress(Exception):
                await outputs.aclose()
            self.active.pop(request_id, None)
            self.served += 1

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S / 2)
            now = time.monotonic()
            for active in list(self.active.values()):
                if now - active.last_sent >= HEARTBEAT_S:
                    active.last_sent = now
                    with contextlib.suppress(Exception):
                        await self._send(active.inbox, Heartbeat())

    async def drain(self, timeout: float) -> int:
        """Stop taking requests, let in-flight ones finish for up to ``timeout`` seconds,
        cancel the rest. Returns how many were cancelled.

        The subscription stays until the end: a request routed here by a frontend whose view
        still lists this instance gets a retryable refusal at once (not an ack timeout), and
        a Cancel for an in-flight request still arrives."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.active.values())
        for active in left:
            active.task.cancel()
        for active in left:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await active.task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        return len(left)


# --- frontend side ------------------------------------------------------------------------
class WorkerLost(Exception):
    """The instance stopped answering, left discovery, or refused the request: the request
    may be retried (or migrated) elsewhere."""


class WorkerFailed(Exception):
    """The instance reported an error for this request."""


_LOST = object()

if sys.version_info >= (3, 11):

    async def _next_message(queue: asyncio.Queue, timeout: float) -> object:
        async with asyncio.timeout(timeout):  # raises TimeoutError (= asyncio.TimeoutError)
            return await queue.get()

else:

    async def _next_message(queue: asyncio.Queue, timeout: float) -> object:
        return await asyncio.wait_for(queue.get(), timeout)


class RequestPlaneClient:
    """Streams requests from instances; one per frontend process."""

    def __init__(self, nc: NATS, ack_timeout: float = 5.0, silence_timeout: float = 5.0):
        self.nc = nc
        self.ack_timeout = ack_timeout  # no Ack by then: the instance is gone
        self.silence_timeout = silence_timeout  # no message (not even a heartbeat) by then
        self._prefix = nc.new_inbox()
        self._ids = count()
        self._streams: dict[str, asyncio.Queue] = {}
        self._by_instance: dict[str, set[str]] = {}
        self._sub = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        queue = self._streams.get(msg.subject)
        if queue is not None:
            queue.put_nowait(msg.data)

    def instance_gone(self, instance_id: str) -> None:
        """Fail at once every stream served by an instance that left discovery."""
        for inbox in self._by_instance.pop(instance_id, set()):
            queue = self._streams.get(inbox)
            if queue is not None:
                queue.put_nowait(_LOST)

    async def stream(
        self, subject: str, instance_id: str, work: Work
    ) -> AsyncIterator[EngineOutput]:
        """Engine outputs of one request from one instance. Raises WorkerLost or
        WorkerFailed; closing the iterator early sends Cancel to the instance."""
        inbox = f"{self._prefix}.{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[inbox] = queue
        self._by_instance.setdefault(instance_id, set()).add(inbox)
        finished = False
        try:
            await self.nc.publish(subject, encode(work), reply=inbox)
            timeout = self.ack_timeout
            while True:
                try:
                    # A message already queued (they come in bursts under load) is taken at
                    # once; only an empty queue is waited on. (asyncio.wait_for per message
                    # cost a Task and a timer per token before Python 3.12.)
                    if queue.qsize():
                        data = queue.get_nowait()
                    else:
                        data = await _next_message(queue, timeout)
                except asyncio.TimeoutError:
                    what = "acknowledged" if timeout == self.ack_timeout else "answered"
                    raise WorkerLost(
                        f"instance {instance_id} has not {what} within {timeout:g} s"
                    ) from None
                if data is _LOST:
                    raise WorkerLost(f"instance {instance_id} left discovery")
                message = decode_to_frontend(data)
                timeout = self.silence_timeout
                if isinstance(message, Out):
                    # After the last output the worker's engine is done: a consumer that
                    # stops here (End is still on its way) needs no Cancel.
                    finished = message.output.finish_reason is not None
                    yield message.output
                elif isinstance(message, End):
                    finished = True
                    return
                elif isinstance(message, Fail):
                    finished = True
                    if message.retryable:
                        raise WorkerLost(message.message)
                    raise WorkerFailed(message.message)
                # Ack and Heartbeat only prove the instance is alive.
        finally:
            self._streams.pop(inbox, None)
            inboxes = self._by_instance.get(instance_id)
            if inboxes is not None:
                inboxes.discard(inbox)
                if not inboxes:
                    self._by_instance.pop(instance_id, None)
            if not finished and not self.nc.is_closed:
                with contextlib.suppress(Exception):
                    await self.nc.publish(subject, encode(Cancel(work.request.request_id)))
