"""Discovery in JetStream: workers register instances under a lease, frontends watch them.

A worker puts its ``InstanceRecord`` in the ``dynamo_instances`` key-value bucket and puts
it again every third of its lease with fresh load figures; on a clean exit it deletes the
key. A frontend watches the bucket and drops an instance it has not heard from within the
lease (timed on its own clock, so hosts need no synchronised clocks): that is how a worker
killed with SIGKILL leaves. The bucket's own TTL only bounds how long dead records linger for
frontends that start later. Model cards live in an object store, named by their digest, so
each frontend fetches a model's card once however many instances serve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError

from dynamo_run.distributed.failure_log import FailureLog
from dynamo_run.distributed.wire import (
    CARD_BUCKET,
    DISCOVERY_BUCKET,
    InstanceRecord,
    decode_record,
    encode_record,
)

log = logging.getLogger("dynamo_run.discovery")

DEFAULT_LEASE_S = 3.0
# Records older than this are removed by the server even if no frontend ever saw them go.
BUCKET_TTL_S = 30.0
# How far two hosts' wall clocks may disagree: the allowance when a record's age can only be
# read from its ``updated_at`` (the worker's clock) rather than timed on the observer's own.
CLOCK_SKEW_S = 5.0


def is_live(record: InstanceRecord, age_s: float, *, own_clock: bool) -> bool:
    """The one liveness rule, for frontends and ``dynamo-run ps``: an instance is live while
    its last lease put is at most one lease old. ``own_clock``: ``age_s`` was timed on the
    observer's clock since it saw the put (a frontend watching); otherwise it is the time
    since ``record.updated_at`` (see :func:`wall_clock_age`) and may be off by the skew
    between the two hosts' clocks, so it gets CLOCK_SKEW_S of allowance."""
    allowance = 0.0 if own_clock else CLOCK_SKEW_S
    return age_s <= record.lease_s + allowance


def wall_clock_age(record: InstanceRecord, now: float | None = None) -> float:
    """Seconds since the record was put, by this host's wall clock against the worker's."""
    return (time.time() if now is None else now) - record.updated_at


async def instances_bucket(js: JetStreamContext):
    """The discovery bucket, created on first use (idempotent across racing processes)."""
    try:
        return await js.key_value(DISCOVERY_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            bucket=DISCOVERY_BUCKET,
            history=1,
            ttl=BUCKET_TTL_S,
            storage=js_api.StorageType.MEMORY,
            description="dynamo-run worker instances",
        )


async def cards_store(js: JetStreamContext):
    try:
        return await js.object_store(CARD_BUCKET)
    except BucketNotFoundError:
        return await js.create_object_store(
            CARD_BUCKET,
            config=js_api.ObjectStoreConfig(
                bucket=CARD_BUCKET,
                storage=js_api.StorageType.MEMORY,
                description="dynamo-run model cards",
            ),
        )


async def put_card(js: JetStreamContext, digest: str, data: bytes) -> None:
    store = await cards_store(js)
    with contextlib.suppress(ObjectNotFoundError, NotFoundError):
        info = await store.get_info(digest)
        if info is not None and not info.deleted:
            return
    await store.put(digest, data)


async def get_card(js: JetStreamContext, digest: str) -> bytes:
    store = await cards_store(js)
    result = await store.get(digest)
    return result.data


class Registration:
    """A worker's record in discovery, kept alive until ``withdraw``."""

    def __init__(
        self,
        nc: NATS,
        record: InstanceRecord,
        card_bytes: bytes,
        refresh: Callable[[InstanceRecord], None] | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.record = record
        self.card_bytes = card_bytes
        self.refresh = refresh  # updates record.load before each put
        self._task: asyncio.Task[None] | None = None
        self._withdrawn = False
        # Missed renewals drop the instance from discovery: they must be seen.
        self.renew_failures = FailureLog(
            log, f"discovery lease renewal of instance {record.instance_id}"
        )

    async def publish(self) -> None:
        """Put the card and the record; also used after a reconnect to a restarted server."""
        await put_card(self.js, self.record.card_digest, self.card_bytes)
        await self._put()

    async def _put(self) -> None:
        if self.refresh is not None:
            self.refresh(self.record)
        self.record.updated_at = time.time()
        bucket = await instances_bucket(self.js)
        await bucket.put(self.record.key, encode_record(self.record))

    async def start(self) -> None:
        await self.publish()
        self._task = asyncio.create_task(self._keep_alive(), name="discovery-lease")

    async def _keep_alive(self) -> None:
        period = self.record.lease_s / 3
        card_missing = False
        reconnects = self.nc.stats.get("reconnects", 0)
        while not self._withdrawn:
            await asyncio.sleep(period)
            try:
                # A restarted server may have lost the buckets: put everything again.
                if self.nc.stats.get("reconnects", 0) != reconnects:
                    reconnects = self.nc.stats.get("reconnects", 0)
                    card_missing = True
                if card_missing:
                    await put_card(self.js, self.record.card_digest, self.card_bytes)
                    card_missing = False
                await self._put()
                self.renew_failures.succeeded()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away or restarted: retry next period
                card_missing = True
                self.renew_failures.failed(exc)

    async def set_draining(self) -> None:
        self.record.draining = True
        with contextlib.suppress(Exception):
            await self._put()

    async def withdraw(self) -> None:
        """Leave discovery at once (clean shutdown), before in-flight requests finish."""
        self._withdrawn = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            bucket = await instances_bucket(self.js)
            await bucket.delete(self.record.key)


class InstanceWatcher:
    """A frontend's live view of discovery, optionally restricted to a key prefix
    (``ns.component.endpoint``). ``on_change`` is called after every change of the set;
    ``on_lost`` for an instance that missed its lease (it died: its streams are lost), not
    for one that left cleanly (it finishes what it was serving)."""

    def __init__(
        self,
        nc: NATS,
        prefix: str | None = None,
        on_change: Callable[[], None] | None = None,
        on_lost: Callable[[InstanceRecord], None] | None = None,
        sweep_s: float = 0.25,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.prefix = prefix
        self.on_change = on_change
        self.on_lost = on_lost
        self.sweep_s = sweep_s
        self.instances: dict[str, InstanceRecord] = {}
        self._seen: dict[str, float] = {}  # key -> monotonic time of the last put
        self._tasks: list[asyncio.Task[None]] = []
        self._synced = asyncio.Event()
        self._restart = asyncio.Event()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._watch_forever(), name="discovery-watch"),
            asyncio.create_task(self._sweep_forever(), name="discovery-sweep"),
        ]

    async def wait_synced(self, timeout: float = 5.0) -> bool:
        """True once the records present at start have been read."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._synced.wait(), timeout)
        return self._synced.is_set()

    def rewatch(self) -> None:
        """Start the watch afresh (after a reconnect: the server may have lost its state)."""
        self._restart.set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- watching ---------------------------------------------------------------------
    async def _watch_forever(self) -> None:
        pattern = f"{self.prefix}.>" if self.prefix else ">"
        while True:
            self._restart.clear()
            watcher = None
            try:
                bucket = await instances_bucket(self.js)
                watcher = await bucket.watch(pattern)
                replaying = True  # records put before the watch began, until None
                while not self._restart.is_set():
                    try:
                        entry = await watcher.updates(timeout=1.0)
                    except nats.errors.TimeoutError:  # nothing new
                        continue
                    if entry is None:
                        replaying = False
                        self._synced.set()
                        continue
                    self._apply(entry.key, entry.value, entry.operation, replayed=replaying)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("discovery watch interrupted: %s", exc)
                await asyncio.sleep(0.5)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()

    def _apply(
        self, key: str, value: bytes | None, operation: str | None, replayed: bool = False
    ) -> None:
        """A put or delete from the watch. A put seen live was just made; a ``replayed`` one
        (made before the watch began) may be a dead worker's last, judged by its age."""
        if operation in ("DEL", "PURGE") or not value:
            if self.instances.pop(key, None) is not None:
                self._seen.pop(key, None)
                self._changed()
            return
        try:
            record = decode_record(value)
        except Exception as exc:
            log.warning("discovery: ignoring a malformed record %s: %s", key, exc)
            return
        if replayed and not is_live(record, wall_clock_age(record), own_clock=False):
            return  # an old record replayed at start: its worker is gone
        known = key in self.instances
        old = self.instances.get(key)
        self.instances[key] = record
        self._seen[key] = time.monotonic()
        if not known or old is None or old.draining != record.draining:
            self._changed()

    async def _sweep_forever(self) -> None:
        reconnects = self.nc.stats.get("reconnects", 0)
        while True:
            await asyncio.sleep(self.sweep_s)
            if self.nc.stats.get("reconnects", 0) != reconnects:
                reconnects = self.nc.stats.get("reconnects", 0)
                self.rewatch()  # the server may be a new one with a new bucket
            now = time.monotonic()
            expired = [
                key
                for key, record in self.instances.items()
                if not is_live(record, now - self._seen.get(key, now), own_clock=True)
            ]
            for key in expired:
                log.info("discovery: instance %s missed its lease; dropped", key)
                record = self.instances.pop(key, None)
                self._seen.pop(key, None)
                if record is not None and self.on_lost is not None:
                    self.on_lost(record)
            if expired:
                self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
