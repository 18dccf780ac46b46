"""A worker's own /metrics, on Dynamo's system status port (``DYN_SYSTEM_PORT``).

A worker has no HTTP server of its own, so a failure in its background loops (renewing its
lease, publishing KV events) was visible nowhere. The series are read from live counters at
scrape time; the server is prometheus_client's, on a daemon thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dynamo_run.distributed.failure_log import FailureLog

PREFIX = "dynamo_component_"


class WorkerCounters(Collector):
    """Requests served and in flight, and the background failures, of one instance.
    ``kv_failures`` is None while the engine publishes no KV events."""

    def __init__(
        self,
        instance_id: str,
        served: Callable[[], int],
        in_flight: Callable[[], int],
        lease_failures: FailureLog,
        kv_failures: Callable[[], FailureLog | None],
    ) -> None:
        self.instance_id = instance_id
        self._served = served
        self._in_flight = in_flight
        self._lease = lease_failures
        self._kv = kv_failures

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["instance"]
        value = [self.instance_id]
        requests = CounterMetricFamily(
            PREFIX + "requests", "Requests this instance served", labels=labels
        )
        requests.add_metric(value, self._served())
        inflight = GaugeMetricFamily(
            PREFIX + "inflight_requests", "Requests in flight on this instance", labels=labels
        )
        inflight.add_metric(value, self._in_flight())
        lease = CounterMetricFamily(
            PREFIX + "lease_renew_failures",
            "Failed renewals of the discovery lease (enough in a row drop the instance)",
            labels=labels,
        )
        lease.add_metric(value, self._lease.total)
        kv = CounterMetricFamily(
            PREFIX + "kv_event_publish_failures",
            "KV cache events that could not be published to routers",
            labels=labels,
        )
        kv_log = self._kv()
        kv.add_metric(value, kv_log.total if kv_log is not None else 0)
        yield from (requests, inflight, lease, kv)


def serve_metrics(host: str, port: int, counters: WorkerCounters) -> WSGIServer:
    """Serve /metrics on host:port until ``shutdown()``; raises OSError if the port is taken."""
    registry = CollectorRegistry()
    registry.register(counters)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
