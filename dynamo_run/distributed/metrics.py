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
    ) -> None:
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.errors: dict[tuple[str, str], int] = defaultdict(int)
        self.migrations: dict[str, int] = defaultdict(int)
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
        yield from (requests, errors, migrations, inflight, live)
