"""Prometheus metrics with Dynamo's frontend names, on a private registry.

One :class:`FrontendMetrics` owns the registry so that several servers (or tests) in one
process never collide, and any input (http, batch, shell) can record the same series. The
per-token path (:meth:`RequestTimer.tokens`) is a clock read and one histogram observation.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from dynamo_run.engine import Engine

PREFIX = "dynamo_frontend_"

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
_DURATION_BUCKETS = (
    0.005,
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
_TOKEN_BUCKETS = (0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)


class _Series:
    """One label set of a :class:`LoopHistogram`: per-bucket counts and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class LoopHistogram(Collector):
    """A histogram for the per-token path, observed only from the event loop thread: a
    bisect and two additions, without prometheus-client's locks (about 5x cheaper)."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(sorted(buckets))
        self._series: dict[str, _Series] = {}
        registry.register(self)

    def labels(self, model: str) -> _Series:
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = _Series(self.bounds)
        return series

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=["model"])]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model"])
        for model, series in list(self._series.items()):
            counts = list(series.counts)
            cumulative, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric([model], buckets, series.sum)
        yield family


class FrontendMetrics:
    """The frontend's request, latency and token metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # prometheus-client appends ``_total`` to a counter's name.
        self.requests = Counter(
            PREFIX + "requests",
            "Requests handled, by endpoint, request type and HTTP status",
            ["model", "endpoint", "request_type", "status"],
            registry=r,
        )
        self.inflight = Gauge(
            PREFIX + "inflight_requests", "Requests being generated now", ["model"], registry=r
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from request arrival to the first generated text",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = LoopHistogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive generated tokens",
            _ITL_BUCKETS,
            r,
        )
        self.input_tokens = Histogram(
            PREFIX + "input_sequence_tokens",
            "Prompt length in tokens (the _sum is the input token counter)",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.output_tokens = Histogram(
            PREFIX + "output_sequence_tokens",
            "Generated length in tokens (the _sum is the output token counter)",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Time from request arrival to the end of its response",
            ["model"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.engine_inflight = Gauge(
            "dynamo_engine_inflight_requests",
            "Requests the local engine is still generating",
            ["model"],
            registry=r,
        )

    def count_request(self, model: str, endpoint: str, request_type: str, status: int) -> None:
        self.requests.labels(model, endpoint, request_type, str(status)).inc()

    def watch_engine(self, model: str, engine: Engine) -> None:
        """Expose the engine's requests in flight (its ``load()``), read at scrape time."""
        self.engine_inflight.labels(model).set_function(lambda: float(engine.load().in_flight))

    def timer(self, model: str, input_tokens: int, start: float | None = None) -> RequestTimer:
        """Start timing one generation request; ``start`` (perf_counter) is its arrival."""
        return RequestTimer(self, model, input_tokens, start)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for a /metrics endpoint."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Latency bookkeeping for one request: TTFT, inter-token gaps, duration, tokens."""

    __slots__ = ("_done", "_itl", "_last", "_metrics", "_model", "input_tokens", "start")

    def __init__(
        self, metrics: FrontendMetrics, model: str, input_tokens: int, start: float | None = None
    ) -> None:
        self._metrics = metrics
        self._model = model
        self._itl = metrics.itl.labels(model)
        self.input_tokens = input_tokens
        self.start = time.perf_counter() if start is None else start
        self._last: float | None = None
        self._done = False
        metrics.inflight.labels(model).inc()

    def tokens(self, count: int) -> None:
        """``count`` new tokens arrived: the first call records TTFT, later ones the gap."""
        now = time.perf_counter()
        if self._last is None:
            self._metrics.ttft.labels(self._model).observe(now - self.start)
        elif count > 0:
            self._itl.observe((now - self._last) / count)
        self._last = now

    def finish(self, output_tokens: int) -> None:
        """The request ended (completed, failed or cancelled). Safe to call twice."""
        if self._done:
            return
        self._done = True
        m, model = self._metrics, self._model
        m.inflight.labels(model).dec()
        m.duration.labels(model).observe(time.perf_counter() - self.start)
        m.input_tokens.labels(model).observe(self.input_tokens)
        m.output_tokens.labels(model).observe(output_tokens)
