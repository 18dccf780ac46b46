"""``out=dyn``: the models that live workers serve, each behind a RemoteEngine.

A model appears when its first instance registers (after its card is fetched once from the
card store) and disappears when its last instance leaves. Every model gets the same
frontend pipeline (template, generation defaults, detokeniser) as a local one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from dynamo_run.distributed.discovery import InstanceWatcher, get_card
from dynamo_run.distributed.kv_events import KvEventSubscriber
from dynamo_run.distributed.kv_index import ApproxKvIndex, KvIndex
from dynamo_run.distributed.kv_router import KvRouter
from dynamo_run.distributed.metrics import InstanceCounters
from dynamo_run.distributed.remote_engine import RemoteEngine
from dynamo_run.distributed.replica_sync import ReplicaSync
from dynamo_run.distributed.request_plane import RequestPlaneClient
from dynamo_run.distributed.router import Router
from dynamo_run.distributed.wire import InstanceRecord
from dynamo_run.model.card import CardOverrides
from dynamo_run.model.card_wire import card_from_bytes
from dynamo_run.pipeline.admission import AdmissionSettings
from dynamo_run.pipeline.client import ModelClient

log = logging.getLogger("dynamo_run.frontend")


@dataclass
class RouterSettings:
    mode: str = "round-robin"
    block_size: int = 16
    overlap_score_weight: float = 1.0
    temperature: float = 0.0
    kv_events: bool = True
    replica_sync: bool = False

    def build(self) -> Router | KvRouter:
        if self.mode != "kv":
            return Router(self.mode)
        index = KvIndex(self.block_size) if self.kv_events else ApproxKvIndex(self.block_size)
        return KvRouter(
            index,
            block_size=self.block_size,
            overlap_score_weight=self.overlap_score_weight,
            temperature=self.temperature,
        )


class RemoteModels:
    """The frontend's directory of remote models (see pipeline.directory.ModelDirectory)."""

    def __init__(
        self,
        nc: Any,
        endpoint_prefix: str | None,
        routing: RouterSettings | None = None,
        migration_limit: int = 0,
        request_template: dict[str, Any] | None = None,
        generation_config: str = "auto",
        overrides: CardOverrides | None = None,
        admission: AdmissionSettings | None = None,
    ) -> None:
        self.nc = nc
        self.admission = admission or AdmissionSettings()
        self.overrides = overrides or CardOverrides()
        self.prefix = endpoint_prefix
        self.request_template = request_template
        self.generation_config = generation_config
        self.migration_limit = migration_limit
        self.routing = routing or RouterSettings()
        self.router = self.routing.build()
        self.kv_events: KvEventSubscriber | None = None
        self.replica_sync: ReplicaSync | None = None
        if isinstance(self.router, KvRouter) and self.routing.replica_sync:
            self.replica_sync = ReplicaSync(nc, self.router, endpoint_prefix)
        if isinstance(self.router, KvRouter) and self.routing.kv_events:
            index = self.router.index
            self.kv_events = KvEventSubscriber(nc, endpoint_prefix, index.apply)
        self.stats = InstanceCounters(
            lambda: self.router.in_flight,
            lambda: list(self.watcher.instances.values()),
            self.router.index.cached_blocks if isinstance(self.router, KvRouter) else None,
        )
        self.plane = RequestPlaneClient(nc)
        self.watcher = InstanceWatcher(nc, endpoint_prefix, self._on_change, self._on_lost)
        self.clients: dict[str, ModelClient] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._live_ids: set[str] = set()
        self._seen: set[str] = set()  # every model an instance ever registered for
        self._changed = asyncio.Event()

    async def start(self) -> None:
        await self.plane.start()
        await self.watcher.start()
        if self.kv_events is not None:
            await self.kv_events.start()
        if self.replica_sync is not None:
            await self.replica_sync.start()
        await self.watcher.wait_synced(5.0)

    def metrics_collector(self) -> InstanceCounters:
        """Per-instance series for the frontend's /metrics."""
        return self.stats

    async def stop(self) -> None:
        await self.watcher.stop()
        if self.kv_events is not None:
            await self.kv_events.stop()
        if self.replica_sync is not None:
            await self.replica_sync.stop()
        for task in self._loading.values():
            task.cancel()

    @property
    def where(self) -> str:
        return f"dyn://{self.prefix}" if self.prefix else "any namespace"

    # --- the directory ----------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.clients)

    def get(self, name: str) -> ModelClient | None:
        return self.clients.get(name)

    def was_served(self, name: str) -> bool:
        return name in self._seen

    def instances_of(self, model: str) -> list[InstanceRecord]:
        return [r for r in self.watcher.instances.values() if r.model == model]

    async def wait_for_model(self, name: str | None, timeout: float) -> ModelClient | None:
        """The named model (or the only one) once an instance serves it."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if name is not None and name in self.clients:
                return self.clients[name]
            if name is None and self.clients:
                return self.clients[self.names()[0]]
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                return None

    # --- keeping up with discovery ----------------------------------------------------
    def _on_lost(self, record: InstanceRecord) -> None:
        """An instance missed its lease: its streams are lost, its cache with it."""
        self.plane.instance_gone(record.instance_id)
        if isinstance(self.router, KvRouter):
            self.router.remove_instance(record.instance_id)

    def _on_change(self) -> None:
        live = self.watcher.instances.values()
        ids = {r.instance_id for r in live}
        if isinstance(self.router, KvRouter):
            # Instances that left: forget their KV. Only those seen live before: a replayed
            # event may name an instance whose record this frontend has not read yet.
            for gone in self._live_ids - ids:
                log.info("instance %s left: its KV blocks are forgotten", gone)
                self.router.remove_instance(gone)
        self._live_ids = ids
        by_model: dict[str, InstanceRecord] = {}
        for record in live:
            by_model.setdefault(record.model, record)
        self._seen.update(by_model)
        for model, record in by_model.items():
            if model not in self.clients and model not in self._loading:
                self._loading[model] = asyncio.create_task(self._add_model(record))
        for model in list(self.clients):
            if model not in by_model:
                log.info("model %s: its last instance left", model)
                del self.clients[model]
        self._changed.set()

    async def _add_model(self, record: InstanceRecord) -> None:
        try:
            data = await get_card(self.nc.jetstream(), record.card_digest)
            card = self.overrides.apply(await asyncio.to_thread(card_from_bytes, data))
        except Exception as exc:
            log.warning("model %s: cannot fetch its card: %s", record.model, exc)
            await asyncio.sleep(1.0)
            self._loading.pop(record.model, None)
            self._on_change()  # try again while the instance is still there
            return
        self._loading.pop(record.model, None)
        if not self.instances_of(record.model):
            return
        engine = RemoteEngine(
            record.model,
            lambda: self.instances_of(record.model),
            self.plane,
            self.router,
            self.migration_limit,
            f"{record.namespace}.{record.component}.{record.endpoint}",
            self.stats,
            self.admission,
        )
        self.clients[record.model] = ModelClient(
            card, engine, self.request_template, self.generation_config
        )
        log.info("model %s: served by %s", record.model, record.subject)
        self._changed.set()
