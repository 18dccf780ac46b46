"""dynamo_run.metrics: the lock-free inter-token histogram exports exactly what
prometheus-client's own Histogram would, and a request's timer records each series once."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from dynamo_run.echo import EchoEngine
from dynamo_run.metrics import FrontendMetrics, LoopHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)
VALUES = (0.0005, 0.001, 0.002, 0.05, 0.1, 0.5, 3.0, 0.0)


def _samples(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines() if not line.startswith("#"))


def test_loop_histogram_matches_prometheus_histogram() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = LoopHistogram("lat_seconds", "latency", BUCKETS, ours)
    reference = Histogram("lat_seconds", "latency", ["model"], buckets=BUCKETS, registry=theirs)
    for value in VALUES:
        fast.labels("m").observe(value)
        reference.labels("m").observe(value)
    expected = [s for s in _samples(theirs) if "_created" not in s]
    assert _samples(ours) == expected


def test_timer_records_one_request() -> None:
    metrics = FrontendMetrics()
    timer = metrics.timer("m", input_tokens=7)
    assert (
        metrics.registry.get_sample_value("dynamo_frontend_inflight_requests", {"model": "m"}) == 1
    )
    for _ in range(4):
        timer.tokens(1)
    timer.finish(output_tokens=4)
    timer.finish(output_tokens=4)  # a second call changes nothing

    def value(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model": "m"})

    assert value("dynamo_frontend_inflight_requests") == 0
    assert value("dynamo_frontend_time_to_first_token_seconds_count") == 1
    assert value("dynamo_frontend_inter_token_latency_seconds_count") == 3
    assert value("dynamo_frontend_input_sequence_tokens_sum") == 7
    assert value("dynamo_frontend_output_sequence_tokens_sum") == 4
    assert value("dynamo_frontend_request_duration_seconds_count") == 1


def test_engine_in_flight_is_read_at_scrape_time() -> None:
    metrics, engine = FrontendMetrics(), EchoEngine(0)
    metrics.watch_engine("m", engine)
    engine.in_flight = 3
    assert metrics.registry.get_sample_value("dynamo_engine_inflight_requests", {"model": "m"}) == 3
    metrics.count_request("m", "completions", "stream", 200)
    labels = {"model": "m", "endpoint": "completions", "request_type": "stream", "status": "200"}
    assert metrics.registry.get_sample_value("dynamo_frontend_requests_total", labels) == 1
