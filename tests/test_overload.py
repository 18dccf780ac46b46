"""Overload, with real processes: a mocker worker behind a frontend over a real nats-server
(and a local mocker server), many more streaming clients than the engine decodes at once.

Requests past the capacity plus the queue get 503 with Retry-After at once while the admitted
ones complete; clients that hang up leave every queue at once, so the next request is served
as fast as on an idle worker; /health stays quick meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import statistics
import time

import httpx
import openai
import pytest
from dist_helpers import Worker, frontend, start_nats, start_procs, wait_models
from http_helpers import MODEL_NAME, Server, metric, parse_metrics

# Each step decodes every running sequence: 10 ms + 0.5 ms per sequence, plus 1 ms per
# prompt token prefilled (a costly prefill makes every wasted admission show).
MOCKER = {"max_num_seqs": 4, "prefill_ms_per_token": 1.0}
SLOTS = MOCKER["max_num_seqs"]
NAMESPACES = itertools.count()
PROMPT = "Tell me a long story about a lighthouse keeper and the sea, please."


@pytest.fixture(scope="module")
def nats():
    yield from start_nats()


@pytest.fixture()
def procs():
    yield from start_procs()


def serve(procs, nats, where: str, args: list[str] | None = None) -> Server:
    """A server whose model runs on the mocker: locally, or on a worker over NATS."""
    if where == "local":
        server = Server(out="mocker", engine_args=MOCKER, args=args)
        procs.append(server)
        server.wait_ready()
        return server
    # Its own namespace: a worker of an earlier test lingers in discovery for its lease.
    endpoint = f"dyn://overload{next(NAMESPACES)}.backend.generate"
    worker = Worker(nats.url, out="mocker", endpoint=endpoint, engine_args=MOCKER)
    procs.append(worker)
    worker.wait_ready()
    server = frontend(nats.url, out=endpoint, args=args)
    procs.append(server)
    server.wait_ready()
    wait_models(server, [MODEL_NAME])
    return server


async def health_probe(root: str, stop: asyncio.Event) -> list[float]:
    """/health latencies, one probe every 20 ms until ``stop``."""
    seen: list[float] = []
    async with httpx.AsyncClient(timeout=10) as http:
        while not stop.is_set():
            start = time.perf_counter()
            res = await http.get(root + "/health")
            seen.append(time.perf_counter() - start)
            assert res.status_code == 200
            await asyncio.sleep(0.02)
    return seen


@pytest.mark.parametrize("where", ["local", "remote"])
def test_past_capacity_and_queue_clients_get_503_with_retry_after_at_once(nats, procs, where):
    """120 streaming clients at once on 4 decode slots: the default queue (twice the slots)
    takes 8 more; the rest are refused at once with 503 + Retry-After and an OpenAI error
    body, and every admitted answer completes."""
    server = serve(procs, nats, where)
    clients = 120
    max_tokens = 80

    async def scenario():
        client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0)
        idle_health = statistics.median(await _idle_health(server.root))
        stop = asyncio.Event()
        probe = asyncio.create_task(health_probe(server.root, stop))

        async def one(i: int):
            start = time.perf_counter()
            try:
                stream = await client.chat.completions.create(
                    model=MODEL_NAME, messages=[{"role": "user", "content": f"{PROMPT} {i}"}],
                    max_tokens=max_tokens, stream=True,
                )  # fmt: skip
            except openai.APIStatusError as exc:
                return exc, time.perf_counter() - start
            pieces, finish = [], None
            async for chunk in stream:
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
            return (pieces, finish), time.perf_counter() - start

        results = await asyncio.gather(*(one(i) for i in range(clients)))
        stop.set()
        health = await probe
        await client.close()
        return results, health, idle_health

    results, health, idle_health = asyncio.run(scenario())
    refused = [(r, t) for r, t in results if isinstance(r, openai.APIStatusError)]
    answered = [(r, t) for r, t in results if not isinstance(r, openai.APIStatusError)]
    # All 120 arrive within a few ms, long before the first answer ends (40 steps): the
    # slots and the queue are full and stay so.
    assert SLOTS + 2 * SLOTS <= len(answered) <= SLOTS + 2 * SLOTS + 4, len(answered)
    for (pieces, finish), _ in answered:
        assert finish == "length" and "".join(pieces), (pieces, finish)
    for exc, _ in refused:
        assert exc.status_code == 503
        assert exc.response.headers["retry-after"] == "1"
        error = exc.body
        assert error["code"] == "overloaded" and error["type"] == "service_unavailable"
        assert "overloaded" in error["message"] and MODEL_NAME in error["message"]
    # Refusing is immediate: every refusal is in before the first admitted answer ends (80
    # decode steps), and by the server's access log each took a small part of an answer's
    # time (the 120 requests of the burst are handled together, so each one's time is most
    # of the burst's; the client's own event loop, opening 120 streams, adds its lag).
    quickest_answer = min(t for _, t in answered)
    assert max(t for _, t in refused) < quickest_answer
    times = [
        float(ms) for ms in re.findall(r'"POST /v1/chat/completions" 503 ([0-9.]+)ms', server.log())
    ]
    assert len(times) == len(refused)
    assert statistics.median(times) < 200 * quickest_answer, (times, quickest_answer)  # 1/5
    # /health stays quick through the burst (the refusals cost the server little).
    assert statistics.median(health) < max(0.05, 10 * idle_health), (health, idle_health)
    values = server.metrics()
    assert metric(values, "dynamo_frontend_requests_total", status="503") == len(refused)
    assert metric(values, "dynamo_frontend_inflight_requests") == 0


async def _idle_health(root: str) -> list[float]:
    out = []
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(10):
            start = time.perf_counter()
            (await http.get(root + "/health")).raise_for_status()
            out.append(time.perf_counter() - start)
    return out


async def short_request(http: httpx.AsyncClient, url: str) -> float:
    """Seconds to the end of an 8-token streamed answer."""
    body = {
        "model": MODEL_NAME, "stream": True, "max_tokens": 8,
        "messages": [{"role": "user", "content": PROMPT}],
    }  # fmt: skip
    start = time.perf_counter()
    async with http.stream("POST", url + "/chat/completions", json=body) as res:
        assert res.status_code == 200, await res.aread()
        lines = [line async for line in res.aiter_lines()]
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]", lines[-3:]
    return time.perf_counter() - start


@pytest.mark.parametrize(
    "queue_in",
    [
        # Every request goes to the worker, which queues what it cannot decode (the issue's
        # case): abandoned ones must leave its engine's waiting queue.
        pytest.param(["--max-inflight-per-worker", "0"], id="worker-queue"),
        # The frontend holds what the worker has no slot for: they must leave its queue.
        pytest.param(["--request-queue-limit", "1000"], id="frontend-queue"),
    ],
)
def test_clients_that_hang_up_leave_every_queue_at_once(nats, procs, queue_in):
    """150 streaming clients on 4 slots, hung up together while most still wait for their
    first token: right after, a short request is served about as fast as on an idle worker.
    (Before the fix each abandoned request was still admitted, prefilled and run one step
    before its cancel took effect: seconds of work for nobody.)"""
    server = serve(procs, nats, "remote", queue_in)
    clients = 150

    async def scenario():
        limits = httpx.Limits(max_connections=clients + 10)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            idle = [await short_request(http, server.url) for _ in range(4)][1:]
            started = asyncio.Event()

            async def long_stream(i: int) -> None:
                body = {
                    "model": MODEL_NAME, "stream": True, "max_tokens": 500,
                    "messages": [{"role": "user", "content": f"{PROMPT} {i}"}],
                }  # fmt: skip
                async with http.stream("POST", server.url + "/chat/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        started.set()

            tasks = [asyncio.create_task(long_stream(i)) for i in range(clients)]
            await asyncio.wait_for(started.wait(), 30)
            deadline = time.monotonic() + 30
            while True:  # every request is in the pipeline: 4 decoding, the rest queued
                text = (await http.get(server.root + "/metrics")).text
                if metric(parse_metrics(text), "dynamo_frontend_inflight_requests") >= clients:
                    break
                assert time.monotonic() < deadline, "the clients' requests did not all arrive"
                await asyncio.sleep(0.1)
            for task in tasks:
                task.cancel()  # every client hangs up (its connection closes)
            await asyncio.gather(*tasks, return_exceptions=True)
            after = await short_request(http, server.url)
            return statistics.median(idle), after

    idle, after = asyncio.run(scenario())
    # Without the fix: 146 abandoned prefills of ~20 ms each on 4 slots, > 1 s.
    assert after < 2 * idle + 0.3, (idle, after)
    values = server.metrics()
    assert metric(values, "dynamo_frontend_worker_inflight_requests") == 0
    assert metric(values, "dynamo_frontend_inflight_requests") == 0


def test_a_worker_over_the_decode_blocks_threshold_takes_no_new_request(nats, procs):
    """--active-decode-blocks-threshold 0.5: one answer that reserves most of a small KV pool
    makes the worker busy (as its record reports, renewed every 2/3 s here); with no queue
    the next request is refused, and taken again once that answer has gone."""
    endpoint = f"dyn://overload{next(NAMESPACES)}.backend.generate"
    engine = {"max_num_seqs": 4, "num_gpu_blocks": 64}  # 16-token blocks: 1024 tokens
    worker = Worker(nats.url, out="mocker", endpoint=endpoint, engine_args=engine)
    procs.append(worker)
    worker.wait_ready()
    flags = ["--active-decode-blocks-threshold", "0.5", "--request-queue-limit", "0"]
    server = frontend(nats.url, out=endpoint, args=flags)
    procs.append(server)
    server.wait_ready()
    wait_models(server, [MODEL_NAME])
    short = {
        "model": MODEL_NAME, "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
    }  # fmt: skip
    long = {**short, "max_tokens": 700, "stream": True}  # ~46 of the 64 blocks, reserved
    with httpx.Client(timeout=60) as http:
        assert http.post(server.url + "/chat/completions", json=short).status_code == 200
        with http.stream("POST", server.url + "/chat/completions", json=long) as busy:
            lines = busy.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            time.sleep(2.0)  # the worker's record shows the reservation
            res = http.post(server.url + "/chat/completions", json=short)
            assert res.status_code == 503, res.text
            assert res.headers["retry-after"] == "1"
            assert res.json()["error"]["code"] == "overloaded"
        # The client hung up: its blocks are freed; the next record says so.
        deadline = time.monotonic() + 10
        while (res := http.post(server.url + "/chat/completions", json=short)).status_code != 200:
            assert res.status_code == 503 and time.monotonic() < deadline, res.text
            time.sleep(0.2)


def test_a_cancel_right_behind_its_request_leaves_nothing_on_the_worker(nats):
    """A client that hangs up at once sends Cancel just behind its request: the worker reads
    both before the request's task first runs, and must not count it in flight (nor send it
    heartbeats) for ever. Real worker endpoint, real mocker engine, real nats-server."""
    import nats as nats_py

    from dynamo_run.distributed.request_plane import EndpointServer
    from dynamo_run.distributed.wire import Cancel, Work, encode
    from dynamo_run.engine import EngineConfig
    from dynamo_run.mocker.config import parse_settings
    from dynamo_run.mocker.engine import MockerEngine
    from dynamo_run.protocol.internal import PreprocessedRequest, StopConditions

    async def scenario() -> tuple[int, int]:
        worker_nc = await nats_py.connect(nats.url)
        client_nc = await nats_py.connect(nats.url)
        engine = MockerEngine(parse_settings(EngineConfig(extra=MOCKER)), [5, 6, 7])
        server = EndpointServer(worker_nc, "dyn.cancel.at.once", engine, "i1")
        await server.start()
        try:
            for k in range(20):
                request = PreprocessedRequest(
                    f"r{k}", [1, 2, 3, 4], stop=StopConditions(max_tokens=50)
                )
                await client_nc.publish(server.subject, encode(Work(request)), reply=f"in.{k}")
                await client_nc.publish(server.subject, encode(Cancel(request.request_id)))
            await client_nc.flush()
            await asyncio.sleep(1.0)
            return server.in_flight, engine.in_flight
        finally:
            await server.drain(1.0)
            await engine.close()
            await client_nc.close()
            await worker_nc.close()

    assert asyncio.run(scenario()) == (0, 0)
