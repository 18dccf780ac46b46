"""``--router-replica-sync``: frontends share the decode load they put on each worker.

Each KV router counts only the requests it sent itself; with several frontends in front of
the same workers, each would see the others' load as zero. With sync on, every frontend
publishes a snapshot of its active blocks per instance twice a second on a NATS subject and
adds the fresh snapshots of the others to its own counts. A frontend that dies stops
publishing and its snapshot expires (3 s), so a dead peer never leaves phantom load behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import msgspec
from nats.aio.client import Client as NATS

from dynamo_run.distributed.kv_router import KvRouter

log = logging.getLogger("dynamo_run.replica_sync")

SYNC_PERIOD_S = 0.5
SNAPSHOT_TTL_S = 3.0


class LoadSnapshot(msgspec.Struct):
    frontend: str
    active: dict[str, int]  # instance id -> active blocks


class ReplicaSync:
    def __init__(self, nc: NATS, router: KvRouter, prefix: str | None) -> None:
        self.nc = nc
        self.router = router
        self.subject = f"dyn.router.load.{prefix or 'all'}"
        self.frontend_id = uuid.uuid4().hex[:12]
        self._peers: dict[str, tuple[float, dict[str, int]]] = {}
        self._sub = None
        self._task: asyncio.Task[None] | None = None
        router.peer_active = self.peer_active

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.subject, cb=self._on_snapshot)
        self._task = asyncio.create_task(self._publish_forever(), name="replica-sync")

    def peer_active(self, instance_id: str) -> int:
        """Active blocks the other frontends have on ``instance_id`` (fresh snapshots only)."""
        now = time.monotonic()
        total = 0
        for stamp, active in self._peers.values():
            if now - stamp <= SNAPSHOT_TTL_S:
                total += active.get(instance_id, 0)
        return total

    async def _on_snapshot(self, msg) -> None:
        try:
            snapshot = msgspec.msgpack.decode(msg.data, type=LoadSnapshot)
        except Exception as exc:
            log.debug("ignoring a malformed load snapshot: %s", exc)
            return
        if snapshot.frontend != self.frontend_id:
            self._peers[snapshot.frontend] = (time.monotonic(), snapshot.active)

    async def _publish_forever(self) -> None:
        while True:
            snapshot = LoadSnapshot(self.frontend_id, self.router.active_snapshot())
            with contextlib.suppress(Exception):
                await self.nc.publish(self.subject, msgspec.msgpack.encode(snapshot))
            now = time.monotonic()
            for peer, (stamp, _) in list(self._peers.items()):
                if now - stamp > SNAPSHOT_TTL_S:
                    del self._peers[peer]
            await asyncio.sleep(SYNC_PERIOD_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
