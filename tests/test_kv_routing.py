"""KV-aware routing end to end: mocker workers publish their KV events, the frontend's
router sends each prompt where its prefix is cached and spreads cold prompts."""

from __future__ import annotations

import time

import httpx
import pytest
from dist_helpers import start_nats, start_procs, wait_models
from http_helpers import MODEL_NAME, metric
from test_distributed import (
    openai_client,
    per_instance,
    ps_json,
    start_frontend,
    start_workers,
)

MOCKER = {"decode_ms_base": 1.0, "decode_ms_per_seq": 0.0, "prefill_ms_per_token": 0.0}
PROMPTS = [" ".join(f"topic{k} word{i}" for i in range(40)) for k in range(6)]


@pytest.fixture(scope="module")
def nats():
    yield from start_nats()


@pytest.fixture()
def procs():
    yield from start_procs()


def cached_tokens(fe, prompt: str) -> int:
    reply = openai_client(fe).completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2)
    details = reply.usage.prompt_tokens_details
    return (details.cached_tokens or 0) if details else 0


def wait_index(fe, blocks: int, timeout: float = 10.0) -> None:
    """Until the frontend's index holds at least ``blocks`` blocks over all instances."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = sum(per_instance(fe, "dynamo_frontend_worker_kv_cached_blocks").values())
        if held >= blocks:
            return
        time.sleep(0.1)
    raise AssertionError(f"the index holds {held} blocks, expected {blocks}")


def test_kv_router_follows_the_cache_and_spreads_cold_prompts(nats, procs):
    endpoint = "dyn://kvr.backend.generate"
    workers = start_workers(procs, nats.url, 3, out="mocker", endpoint=endpoint, engine_args=MOCKER)
    fe = start_frontend(procs, nats.url, endpoint, ["--router-mode", "kv"])
    wait_models(fe, [MODEL_NAME])
    # Cold prompts: nothing cached anywhere, so they spread (2 on each of 3 workers).
    assert all(cached_tokens(fe, p) == 0 for p in PROMPTS)
    counts = per_instance(fe, "dynamo_frontend_worker_requests_total")
    assert sorted(counts.values()) == [2.0, 2.0, 2.0]
    assert set(counts) == {w.instance_id for w in workers}
    wait_index(fe, 6 * 4)
    # Repeats go where the prefix is cached: every one is a cache hit.
    for prompt in PROMPTS:
        assert cached_tokens(fe, prompt) >= 64
    values = fe.metrics()
    predicted = metric(values, "dynamo_frontend_worker_predicted_cached_tokens_total")
    reported = metric(values, "dynamo_frontend_worker_reported_cached_tokens_total")
    assert predicted > 0 and reported >= predicted * 0.9

    # `dynamo-run ps` shows the blocks each worker caches (replayed from the same stream).
    rows = ps_json(nats.url, "kvr")
    assert {r["instance_id"]: r["kv_cached_blocks"] for r in rows} == {
        k: int(v) for k, v in per_instance(fe, "dynamo_frontend_worker_kv_cached_blocks").items()
    }
    # A frontend started later rebuilds the index from the stream and routes the same way.
    fe.stop()
    fresh = start_frontend(procs, nats.url, endpoint, ["--router-mode", "kv"])
    wait_models(fresh, [MODEL_NAME])
    wait_index(fresh, 6 * 4)
    for prompt in PROMPTS:
        assert cached_tokens(fresh, prompt) >= 64


def test_without_kv_events_the_predicted_index_still_follows_a_prefix(nats, procs):
    endpoint = "dyn://kvp.backend.generate"
    start_workers(procs, nats.url, 3, out="mocker", endpoint=endpoint, engine_args=MOCKER)
    fe = start_frontend(procs, nats.url, endpoint, ["--router-mode", "kv", "--no-kv-events"])
    wait_models(fe, [MODEL_NAME])
    for prompt in PROMPTS[:3]:
        assert cached_tokens(fe, prompt) == 0
    for prompt in PROMPTS[:3]:
        assert cached_tokens(fe, prompt) >= 64


def test_round_robin_misses_the_cache_for_contrast(nats, procs):
    """The same repeats under round-robin mostly land on a worker without the prefix."""
    endpoint = "dyn://kvrr.backend.generate"
    start_workers(procs, nats.url, 3, out="mocker", endpoint=endpoint, engine_args=MOCKER)
    fe = start_frontend(procs, nats.url, endpoint)
    wait_models(fe, [MODEL_NAME])
    for prompt in PROMPTS[:2]:  # to workers 1 and 2
        assert cached_tokens(fe, prompt) == 0
    # Round-robin sends the repeats to workers 3 and 1: neither holds that prefix.
    assert [cached_tokens(fe, p) for p in PROMPTS[:2]] == [0, 0]


@pytest.mark.model
def test_llamacpp_workers_events_route_repeats_to_their_cache(nats, procs):
    """Two llamacpp workers on the default model: their KV events steer each repeated
    prompt back to the worker that holds it, which then reports the prefix as cached."""
    endpoint = "dyn://kvl.backend.generate"
    start_workers(
        procs, nats.url, 2, out="llamacpp", endpoint=endpoint,
        engine_args={"n_parallel": 2, "n_threads": 1},
    )  # fmt: skip
    fe = start_frontend(procs, nats.url, endpoint, ["--router-mode", "kv"])
    wait_models(fe, [MODEL_NAME])
    prompts = PROMPTS[:2]
    assert [cached_tokens(fe, p) for p in prompts] == [0, 0]
    counts = per_instance(fe, "dynamo_frontend_worker_requests_total")
    assert sorted(counts.values()) == [1.0, 1.0]  # cold prompts spread
    wait_index(fe, 2 * 8)
    for prompt in prompts:
        assert cached_tokens(fe, prompt) >= 128


def test_replica_sync_shares_load_between_frontends(nats, procs):
    """Frontend B sees the load frontend A put on a worker and routes around it."""
    endpoint = "dyn://sync.backend.generate"
    start_workers(procs, nats.url, 2, endpoint=endpoint, engine_args={"delay_ms": 40})
    flags = ["--router-mode", "kv", "--kv-overlap-score-weight", "0", "--router-replica-sync"]
    fe_a = start_frontend(procs, nats.url, endpoint, flags)
    fe_b = start_frontend(procs, nats.url, endpoint, flags)
    wait_models(fe_a, [MODEL_NAME])
    wait_models(fe_b, [MODEL_NAME])
    long_body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "stream": True}
    short = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", fe_a.url + "/completions", json=long_body) as busy,
    ):
        loaded = busy.headers["x-dynamo-worker"]
        time.sleep(1.5)  # a snapshot or two reaches B
        # Without sync B would alternate between both workers (its own ties spread).
        picks = [
            http.post(fe_b.url + "/completions", json=short).headers["x-dynamo-worker"]
            for _ in range(3)
        ]
    assert loaded not in picks, (loaded, picks)
