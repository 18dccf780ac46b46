"""Per-instance series for a frontend's /metrics, read from live counters at scrape time."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dynamo_run.distributed.remote_engine import InstanceStats
from dynamo_run.distributed.wire import InstanceRecord

PREFIX = "dynamo_frontend_worker_"


class InstanceCounters(InstanceStats, Collector):
    """Requests, errors and migrations per instance, plus in-flight and live-instance gauges
    (``in_flight`` and ``instances`` are callables over the frontend's router and discovery)."""

    def __init__(
        self,
        in_flight: Callable[[], dict[str, int]],
        instances: Callable[[], list[InstanceRecord]],
        cached_blocks: Callable[[str], int] | None = None,
    ) -> None:
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.errors: dict[tuple[str, str], int] = defaultdict(int)
        self.migrations: dict[str, int] = defaultdict(int)
        self.overlap_blocks: dict[tuple[str, str], int] = defaultdict(int)
        self.predicted_cached: dict[tuple[str, str], int] = defaultdict(int)
        self.reported_cached: dict[tuple[str, str], int] = defaultdict(int)
        self._cached_blocks = cached_blocks
        self._in_flight = in_flight
        self._instances = instances
        self._models: dict[str, str] = {}

    def on_request(self, instance: InstanceRecord) -> None:
        self._models[instance.instance_id] = instance.model
        self.requests[(instance.model, instance.instance_id)] += 1

    def on_error(self, instance: InstanceRecord) -> None:
        self.errors[(instance.model, instance.instance_id)] += 1

    def on_migration(self, model: str) -> None:
        self.migrations[model] += 1

    def on_route(self, instance: InstanceRecord, overlap_blocks: int, predicted: int) -> None:
        key = (instance.model, instance.instance_id)
        self.overlap_blocks[key] += overlap_blocks
        self.predicted_cached[key] += predicted

    def on_cached(self, instance: InstanceRecord, cached_tokens: int) -> None:
        self.reported_cached[(instance.model, instance.instance_id)] += cached_tokens

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["model", "instance"]
        requests = CounterMetricFamily(
            PREFIX + "requests", "Requests sent to each worker instance", labels=labels
        )
        for (model, instance), value in self.requests.items():
            requests.add_metric([model, instance], value)
        errors = CounterMetricFamily(
            PREFIX + "errors",
            "Requests a worker instance failed or dropped (retried or migrated where allowed)",
            labels=labels,
        )
        for (model, instance), value in self.errors.items():
            errors.add_metric([model, instance], value)
        migrations = CounterMetricFamily(
            PREFIX + "migrations", "Streams continued on another instance", labels=["model"]
        )
        for model, value in self.migrations.items():
            migrations.add_metric([model], value)
        inflight = GaugeMetricFamily(
            PREFIX + "inflight_requests", "Requests in flight per worker instance", labels=labels
        )
        live = GaugeMetricFamily(
            PREFIX + "instances", "Live worker instances per model", labels=["model"]
        )
        counts: dict[str, int] = defaultdict(int)
        in_flight = self._in_flight()
        for record in self._instances():
            counts[record.model] += 1
            inflight.add_metric(
                [record.model, record.instance_id], in_flight.get(record.instance_id, 0)
            )
        for model, count in counts.items():
            live.add_metric([model], count)
        routed = []
        for name, text, values in (
            ("kv_overlap_blocks", "Cached prefix blocks the router counted on", self.overlap_blocks),
            ("predicted_cached_tokens", "Prompt tokens the router predicted cached", self.predicted_cached),
            ("reported_cached_tokens", "Prompt tokens the worker reported cached", self.reported_cached),
        ):  # fmt: skip
            family = CounterMetricFamily(PREFIX + name, text, labels=labels)
            for (model, instance), value in values.items():
                family.add_metric([model, instance], value)
            routed.append(family)
        yield from (requests, errors, migrations, inflight, live, *routed)
        if self._cached_blocks is not None:
            cached = GaugeMetricFamily(
                PREFIX + "kv_cached_blocks", "KV blocks the router's index holds", labels=labels
            )
            for record in self._instances():
                cached.add_metric(
                    [record.model, record.instance_id], self._cached_blocks(record.instance_id)
                )
            yield cached
